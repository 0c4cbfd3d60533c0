//! What a new user meets in `relora train`'s output without a terminal (a log file, CI, a job
//! scheduler): the loss in the log, outputs checked before the first step, each error said once
//! and in flag names, nothing created by a bad option, and a clear end with what to do next.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn relora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relora"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("running relora")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A tiny ReLoRA run of `steps` steps: switch at 30, a merge every 15, an evaluation every 20.
fn tiny<'a>(out: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--preset",
        "tiny",
        "--steps",
        steps,
        "--warmup-full-steps",
        "30",
        "--reset-every",
        "15",
        "--eval-every",
        "20",
        "--eval-batches",
        "2",
        "--save-every",
        "0",
        "--out",
        out,
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn a_log_without_a_terminal_shows_the_loss_and_every_event() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("r");
    let out = relora(&tiny(run.to_str().unwrap(), "60", &[]));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    for needle in [
        "step 20/60: loss ",
        "step 40/60: loss ",
        "step 60/60: loss ",
        "step 20: train loss ",
        "eval loss ",
        "switched to low-rank adapters",
        "merged phase 1",
    ] {
        assert!(
            err.contains(needle),
            "'{needle}' missing from the log:\n{err}"
        );
    }
    // No progress-bar drawing in a log.
    assert!(!err.contains('\u{1b}') && !err.contains('█'), "{err}");
    // --log-every sets the interval; --quiet keeps only the evaluations.
    let run2 = tmp.path().join("r2");
    let out = relora(&tiny(run2.to_str().unwrap(), "60", &["--log-every", "7"]));
    let err = stderr(&out);
    assert!(
        err.contains("step 7/60: loss") && err.contains("step 56/60: loss"),
        "{err}"
    );
    let run3 = tmp.path().join("r3");
    let out = relora(&tiny(run3.to_str().unwrap(), "60", &["--quiet"]));
    let err = stderr(&out);
    assert!(
        !err.contains("step 20/60") && err.contains("step 20: train loss"),
        "{err}"
    );
}

#[test]
fn the_end_of_a_run_is_on_its_own_lines_and_says_what_to_do_next() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("r");
    let hf = tmp.path().join("hf");
    let (run_s, hf_s) = (run.to_str().unwrap(), hf.to_str().unwrap());
    let out = relora(&tiny(run_s, "45", &["--export", hf_s]));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    let done = lines
        .iter()
        .position(|l| l.starts_with("done: step 45 of 45"))
        .unwrap_or_else(|| panic!("no 'done' line:\n{err}"));
    assert_eq!(
        &lines[done + 1..done + 4],
        [
            format!("checkpoint: {run_s}/checkpoints/step-00000045").as_str(),
            format!("exported: {hf_s} (a Hugging Face model directory)").as_str(),
            "next:"
        ]
    );
    assert!(
        err.contains(&format!("relora generate --checkpoint {run_s} --prompt"))
            && err.contains(&format!(
                "relora eval --checkpoint {run_s} --data builtin-eval"
            ))
            && err.contains(&format!("pipeline('text-generation', model='{hf_s}')")),
        "{err}"
    );

    // On a terminal (where `script` gives one), the bar is cleared before the summary.
    let have_script = Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_script {
        eprintln!("SKIPPED the terminal half: `script` (util-linux) not found");
        return;
    }
    let run_t = tmp.path().join("t");
    let cmd = format!(
        "{} {}",
        env!("CARGO_BIN_EXE_relora"),
        tiny(run_t.to_str().unwrap(), "45", &[]).join(" ")
    );
    let typescript = tmp.path().join("typescript");
    let out = Command::new("script")
        .args(["-qec", &cmd])
        .arg(&typescript)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    for segment in text.split(['\r', '\n']) {
        assert!(
            !(segment.contains("45/45") && segment.contains("done:")),
            "the summary is glued to the bar: {segment:?}"
        );
    }
    assert!(text.contains("done: step 45 of 45"), "{text}");
}

#[test]
fn outputs_are_checked_before_the_first_step() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("file.txt");
    std::fs::write(&file, b"x").unwrap();
    let run = tmp.path().join("r");
    let started = Instant::now();
    let bad_export = file.join("hf");
    let out = relora(&tiny(
        run.to_str().unwrap(),
        "600",
        &["--export", bad_export.to_str().unwrap()],
    ));
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("--export") && err.contains("file.txt") && err.contains("cannot be created"),
        "{err}"
    );
    assert!(!err.contains("step 20/"), "it trained first:\n{err}");
    assert!(!run.exists(), "the run directory was created");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn an_export_that_fails_at_the_end_says_the_checkpoint_is_safe_and_how_to_redo_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("r");
    let hf = tmp.path().join("hf");
    let args = tiny(
        run.to_str().unwrap(),
        "400",
        &["--export", hf.to_str().unwrap()],
    );
    let child = Command::new(env!("CARGO_BIN_EXE_relora"))
        .args(&args)
        .env("RAYON_NUM_THREADS", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While it trains, something else takes the export's path.
    let metrics = run.join("metrics.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 2 {
        assert!(started.elapsed() < Duration::from_secs(60), "never trained");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(hf.join("theirs.txt"), b"t").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    let ckpt = run.join("checkpoints/step-00000400");
    assert!(ckpt.join("manifest.json").exists());
    for needle in [
        "exporting to",
        "is safe",
        &format!("relora-convert merge {} {}", ckpt.display(), hf.display()),
        "theirs.txt",
    ] {
        assert!(err.contains(needle), "'{needle}' missing:\n{err}");
    }
    assert_eq!(std::fs::read(hf.join("theirs.txt")).unwrap(), b"t");
}

#[test]
fn each_os_error_is_said_once_and_a_bad_option_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("r");
    let run_s = run.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["train", "--preset", "nosuch", "--out", run_s],
            "nosuch",
        ),
        (
            vec!["train", "--data", "/nonexistent/corpus.txt", "--out", run_s],
            "/nonexistent/corpus.txt",
        ),
        (vec!["train", "--set", "lr=fast", "--out", run_s], "lr"),
        (
            vec![
                "train",
                "--tokenizer",
                "/nonexistent/tok.json",
                "--out",
                run_s,
            ],
            "/nonexistent/tok.json",
        ),
    ] {
        let out = relora(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(err.matches("os error").count() <= 1, "said twice: {err}");
        assert!(!run.exists(), "{args:?} created {}", run.display());
    }
    let out = relora(&["train", "--data", "/nonexistent/corpus.txt", "--out", run_s]);
    assert_eq!(stderr(&out).matches("No such file or directory").count(), 1);
}

#[test]
fn configuration_errors_name_the_flag_to_change() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("r");
    let run_s = run.to_str().unwrap();
    let out = relora(&[
        "train",
        "--preset",
        "tiny",
        "--steps",
        "20",
        "--warmup-steps",
        "30",
        "--out",
        run_s,
    ]);
    let err = stderr(&out);
    assert!(
        err.contains("--warmup-steps 30 must be below --steps 20"),
        "{err}"
    );
    let out = relora(&[
        "train",
        "--preset",
        "tiny",
        "--reset-every",
        "5",
        "--set",
        "restart_warmup_steps=9",
        "--out",
        run_s,
    ]);
    let err = stderr(&out);
    assert!(
        err.contains("restart_warmup_steps 9 must be below --reset-every 5")
            && err.contains("--set restart_warmup_steps="),
        "{err}"
    );
    assert!(!Path::new(run_s).exists());
}
