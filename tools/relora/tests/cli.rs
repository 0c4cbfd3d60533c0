//! The `relora` program as a user runs it: a resume in a new process continues bit for bit, eval
//! and generate read checkpoints, bench reports, and bad input exits non-zero with a message.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn relora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relora"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("running relora")
}

fn ok(args: &[&str]) -> String {
    let out = relora(args);
    assert!(
        out.status.success(),
        "relora {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `relora bench` of the tiny preset on batches of 2 x 16 tokens with `extra` flags: its output
/// and the JSON it wrote to `json`.
fn bench_tiny(json: &Path, extra: &[&str]) -> (String, serde_json::Value) {
    let mut args = vec![
        "bench",
        "--preset",
        "tiny",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let text = ok(&args);
    let doc = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    (text, doc)
}

fn train_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--preset",
        "tiny",
        "--steps",
        "14",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--warmup-full-steps",
        "4",
        "--reset-every",
        "4",
        "--rank",
        "4",
        "--save-every",
        "0",
        "--eval-every",
        "0",
        "--eval-batches",
        "2",
        "--quiet",
        "--out",
        out,
        "--set",
        "reset_mode=random:0.9",
        "--set",
        "warmup_steps=2",
        "--set",
        "restart_warmup_steps=2",
    ];
    v.extend_from_slice(extra);
    v
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn resume_in_a_new_process_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    ok(&train_args(a, &[]));
    ok(&train_args(b, &["--stop-after", "7"]));
    assert!(Path::new(b)
        .join("checkpoints/step-00000007/manifest.json")
        .exists());
    ok(&train_args(b, &["--resume", b]));
    let ca = Path::new(a).join("checkpoints/step-00000014");
    let cb = Path::new(b).join("checkpoints/step-00000014");
    let (fa, fb) = (files(&ca), files(&cb));
    assert_eq!(fa.len(), fb.len());
    assert!(
        fa.iter()
            .any(|p| p.to_string_lossy().contains("phase-0002")),
        "expected merges: {fa:?}"
    );
    for (x, y) in fa.iter().zip(&fb) {
        assert_eq!(x.strip_prefix(&ca).unwrap(), y.strip_prefix(&cb).unwrap());
        assert!(
            std::fs::read(x).unwrap() == std::fs::read(y).unwrap(),
            "{} differs",
            x.display()
        );
    }
}

#[test]
fn eval_generate_and_bench_work_on_a_trained_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("r");
    let run = run.to_str().unwrap();
    ok(&train_args(run, &["--stop-after", "6"]));
    let json = ok(&[
        "eval",
        "--checkpoint",
        run,
        "--data",
        "builtin-eval",
        "--max-batches",
        "2",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    assert!(loss > 0.0 && loss < 6.0, "{v}");
    assert_eq!(v["step"], 6);
    assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6 * loss.exp());
    let text = ok(&[
        "generate",
        "--checkpoint",
        run,
        "--prompt",
        "The ",
        "--max-tokens",
        "20",
        "--seed",
        "1",
    ]);
    assert!(text.starts_with("The ") && text.len() > 4, "{text}");

    let out = tmp.path().join("bench.json");
    let (_, doc) = bench_tiny(&out, &["--steps", "2", "--warmup", "0"]);
    let modes: Vec<&str> = doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["full", "lora", "relora"]);
    for r in doc["results"].as_array().unwrap() {
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["peak_rss_mib"].as_f64().unwrap() > 0.0);
    }
    let full = &doc["results"][0];
    let relora = &doc["results"][2];
    assert!(relora["trainable_params"].as_u64() < full["trainable_params"].as_u64());
    assert_eq!(doc["layer_nodes"], true);

    // The same with every layer on candle's graph (the A/B switch of the GPU check).
    let (_, doc) = bench_tiny(
        &out,
        &[
            "--steps",
            "1",
            "--warmup",
            "0",
            "--modes",
            "relora",
            "--graph-layers",
        ],
    );
    assert_eq!(doc["layer_nodes"], false);
    assert!(doc["results"][0]["tokens_per_s"].as_f64().unwrap() > 0.0);

    // Profiled: every region of the step, per step, adding up to no more than the step.
    let (text, doc) = bench_tiny(
        &out,
        &[
            "--steps",
            "2",
            "--warmup",
            "1",
            "--modes",
            "full,relora",
            "--profile",
        ],
    );
    assert!(text.contains("where a profiled step goes"), "{text}");
    assert_eq!(doc["profiled"], true);
    for r in doc["results"].as_array().unwrap() {
        let p = &r["profile"];
        let regions = p["regions"].as_array().unwrap();
        let calls = |name: &str| {
            regions
                .iter()
                .find(|x| x["region"] == name)
                .unwrap_or_else(|| panic!("no region {name} in {p}"))["calls"]
                .as_f64()
                .unwrap()
        };
        // The tiny preset has two layers, each with two norms and one attention.
        assert_eq!(calls("layer fwd attention"), 2.0);
        assert_eq!(calls("layer bwd attention"), 2.0);
        assert_eq!(calls("layer fwd norm"), 4.0);
        assert_eq!(calls("fwd loss"), 2.0);
        assert_eq!(calls("opt adamw"), 1.0);
        let sum: f64 = regions.iter().map(|x| x["ms"].as_f64().unwrap()).sum();
        let step = p["mean_step_ms"].as_f64().unwrap();
        assert!(
            sum > 0.0 && sum <= step,
            "regions {sum} ms in a {step} ms step"
        );
    }
}

#[test]
fn bad_input_exits_nonzero_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("r");
    let run = run.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["train", "--data", "/nonexistent/file.txt", "--out", run],
            "/nonexistent/file.txt",
        ),
        (vec!["train", "--set", "lr=fast", "--out", run], "lr"),
        (
            vec!["train", "--set", "nonsense", "--out", run],
            "KEY=VALUE",
        ),
        (vec!["train", "--mode", "fullish", "--out", run], "fullish"),
        (vec!["train", "--device", "cuda:0", "--out", run], "CUDA"),
        (
            vec!["train", "--distributed", "nccl", "--out", run],
            "--distributed nccl",
        ),
        (vec!["train", "--distributed", "gloo", "--out", run], "gloo"),
        (vec!["train", "--preset", "7b", "--out", run], "7b"),
        (
            vec![
                "eval",
                "--checkpoint",
                "/nonexistent",
                "--data",
                "builtin-eval",
            ],
            "/nonexistent",
        ),
    ] {
        let out = relora(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle),
            "{args:?}: expected '{needle}' in:\n{err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    }
}

#[test]
fn train_exports_a_model_directory_and_refuses_to_clobber_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("r");
    let hf = tmp.path().join("hf");
    let (run, hf) = (run.to_str().unwrap(), hf.to_str().unwrap());
    ok(&train_args(run, &["--export", hf]));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        assert!(
            Path::new(hf).join(f).exists(),
            "{f} missing from the export"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(hf).join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["hidden_size"], 64);
    // The same command again must not silently overwrite the run.
    let out = relora(&train_args(run, &["--export", hf]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    ok(&train_args(run, &["--export", hf, "--force"]));
}

/// The weights a run ends with, as the bytes of its final checkpoint's tensor files.
fn final_tensor_bytes(run: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let ckpts = run.join("checkpoints");
    let newest = files(&ckpts)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect::<Vec<_>>();
    assert!(!newest.is_empty(), "no tensors under {}", ckpts.display());
    newest
        .into_iter()
        .map(|p| {
            (
                p.strip_prefix(&ckpts).unwrap().to_path_buf(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn same_seed_gives_identical_weights_whatever_the_thread_count() {
    // The small preset at 4 x 64 tokens is large enough that the matrix kernels split their work
    // across threads; the tiny one is not.
    let tmp = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for threads in ["1", "3"] {
        let out = tmp.path().join(format!("t{threads}-{}", runs.len()));
        let o = out.to_str().unwrap().to_string();
        let mut args = train_args(&o, &["--threads", threads]);
        let preset = args.iter().position(|a| *a == "tiny").unwrap();
        args[preset] = "small";
        // Five steps: the switch to adapters at 2 and a merge with an optimizer reset at 4.
        for (flag, value) in [
            ("--steps", "5"),
            ("--batch-size", "4"),
            ("--seq-len", "64"),
            ("--warmup-full-steps", "2"),
            ("--reset-every", "2"),
        ] {
            let k = args.iter().position(|a| *a == flag).unwrap();
            args[k + 1] = value;
        }
        let k = args
            .iter()
            .position(|a| *a == "restart_warmup_steps=2")
            .unwrap();
        args[k] = "restart_warmup_steps=1";
        ok(&args);
        runs.push(final_tensor_bytes(&out));
    }
    assert!(
        runs[0]
            .iter()
            .any(|(p, _)| p.to_string_lossy().contains("phase-0001")),
        "expected a merge"
    );
    assert_eq!(runs[0].len(), runs[1].len());
    for ((name, a), (_, b)) in runs[0].iter().zip(&runs[1]) {
        assert!(a == b, "{} differs between thread counts", name.display());
    }
}

#[test]
fn force_replaces_only_what_relora_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("r");
    let hf = tmp.path().join("hf");
    let (run_s, hf_s) = (run.to_str().unwrap(), hf.to_str().unwrap());
    ok(&train_args(run_s, &["--export", hf_s]));
    let fails = |args: &[&str], needles: &[&str]| {
        let out = relora(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        for n in needles {
            assert!(err.contains(n), "{args:?}: expected '{n}' in:\n{err}");
        }
    };

    // A user's file in a checkpoint: --force does not delete that checkpoint.
    let ckpt = run.join("checkpoints/step-00000014");
    std::fs::write(ckpt.join("notes.txt"), b"mine").unwrap();
    fails(
        &train_args(run_s, &["--export", hf_s, "--force"]),
        &["notes.txt", "step-00000014"],
    );
    assert_eq!(std::fs::read(ckpt.join("notes.txt")).unwrap(), b"mine");
    assert!(ckpt.join("manifest.json").exists());
    std::fs::remove_file(ckpt.join("notes.txt")).unwrap();

    // A user's file in the export: refused before any training, the run left as it was.
    std::fs::write(hf.join("README.md"), b"my model card").unwrap();
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    fails(
        &train_args(run_s, &["--export", hf_s, "--force"]),
        &["--export", "README.md", "nothing was changed"],
    );
    assert_eq!(
        std::fs::read(hf.join("README.md")).unwrap(),
        b"my model card"
    );
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);
    std::fs::remove_file(hf.join("README.md")).unwrap();
    // relora's own run and export are replaced with --force.
    ok(&train_args(run_s, &["--export", hf_s, "--force"]));

    // A metrics.jsonl that is not relora's log is not deleted by a fresh run.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("metrics.jsonl"), b"my measurements\n").unwrap();
    fails(
        &train_args(other.to_str().unwrap(), &[]),
        &["metrics.jsonl", "not a relora metrics record"],
    );
    assert_eq!(
        std::fs::read(other.join("metrics.jsonl")).unwrap(),
        b"my measurements\n"
    );

    // bench --json replaces its own earlier report, never another file.
    let report = tmp.path().join("report.json");
    bench_tiny(
        &report,
        &["--steps", "1", "--warmup", "0", "--modes", "full"],
    );
    bench_tiny(
        &report,
        &["--steps", "1", "--warmup", "0", "--modes", "full"],
    );
    let notes = tmp.path().join("notes.json");
    std::fs::write(&notes, b"{\"mine\": true}").unwrap();
    let notes_s = notes.to_str().unwrap();
    fails(
        &[
            "bench",
            "--preset",
            "tiny",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--modes",
            "full",
            "--json",
            notes_s,
        ],
        &["notes.json", "not a report of relora bench"],
    );
    assert_eq!(std::fs::read(&notes).unwrap(), b"{\"mine\": true}");
}
