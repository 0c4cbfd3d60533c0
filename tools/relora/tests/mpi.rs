//! Data-parallel training over MPI, run as a user runs it: `mpirun -np 2 relora train
//! --distributed mpi`. Needs the `mpi` feature and Open MPI's `mpirun` (Debian: openmpi-bin,
//! libopenmpi-dev; building also needs libclang-dev):
//! `cargo test -p relora-cli --features mpi --test mpi`.
#![cfg(feature = "mpi")]

use relora::checkpoint::run_dir::checkpoint_dir;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Whether `mpirun` can be started; the tests skip (with a message) when it cannot.
fn have_mpirun() -> bool {
    let ok = Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: mpirun not found (install openmpi-bin and libopenmpi-dev)");
    }
    ok
}

/// `mpirun -np <ranks> relora <args>`, as root if need be, one thread per rank.
fn mpirun(ranks: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", &ranks.to_string()])
        .arg(env!("CARGO_BIN_EXE_relora"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1");
    c
}

fn relora(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_relora"));
    c.args(args).env("RAYON_NUM_THREADS", "1");
    c
}

fn check(what: &str, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A ReLoRA run on the tiny preset: switch to adapters at step 5, merge + optimizer reset
/// before steps 10 and 15, 20 steps in all.
fn tiny_relora<'a>(out: &'a str, grad_accum: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--preset",
        "tiny",
        "--mode",
        "relora",
        "--steps",
        "20",
        "--warmup-full-steps",
        "5",
        "--reset-every",
        "5",
        "--rank",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--set",
        "warmup_steps=2",
        "--set",
        "restart_warmup_steps=1",
        "--set",
        grad_accum,
        "--eval-data",
        "none",
        "--threads",
        "1",
        "--quiet",
        "--out",
        out,
    ]
}

/// The metrics lines of a run directory.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Largest absolute difference between the merged weights of two checkpoints.
fn max_weight_diff(a: &Path, b: &Path) -> f32 {
    let dev = relora::device::parse_device("cpu").unwrap();
    let (ta, _) = relora::checkpoint::load(a, &dev).unwrap();
    let (tb, _) = relora::checkpoint::load(b, &dev).unwrap();
    let (wa, wb) = (ta.merged_weights().unwrap(), tb.merged_weights().unwrap());
    assert_eq!(wa.len(), wb.len());
    let mut worst = 0f32;
    for (name, x) in &wa {
        let y = &wb[name];
        let d = (x - y)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap();
        worst = worst.max(d);
    }
    worst
}

#[test]
fn two_ranks_match_one_process_with_the_same_global_batch_and_resume() {
    if !have_mpirun() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    let dp = tmp.path().join("dp");
    let resumed = tmp.path().join("resumed");
    let (single_s, dp_s, resumed_s) = (
        single.to_str().unwrap(),
        dp.to_str().unwrap(),
        resumed.to_str().unwrap(),
    );
    // Global batch 2 x 2 x 1 = 2 x 1 x 2 ranks.
    check(
        "single process",
        relora(&tiny_relora(single_s, "grad_accum=2"))
            .output()
            .unwrap(),
    );
    let mut args = tiny_relora(dp_s, "grad_accum=1");
    args.extend(["--distributed", "mpi"]);
    check("mpirun -np 2", mpirun(2, &args).output().unwrap());

    let lines = metrics(&dp);
    assert_eq!(lines.len(), 20);
    let resets = lines.iter().filter(|l| !l["reset"].is_null()).count();
    assert!(
        resets >= 2,
        "expected merges + optimizer resets, got {resets}"
    );
    assert!(lines.iter().any(|l| l["switched"] == true));
    assert!(lines.iter().all(|l| l["ranks"] == 2));
    for (s, d) in metrics(&single).iter().zip(&lines) {
        let (ls, ld) = (s["loss"].as_f64().unwrap(), d["loss"].as_f64().unwrap());
        assert!(
            (ls - ld).abs() < 1e-4,
            "step {}: loss {ls} vs {ld}",
            d["step"]
        );
        assert_eq!(s["tokens"], d["tokens"]);
    }
    let diff = max_weight_diff(&checkpoint_dir(&single, 20), &checkpoint_dir(&dp, 20));
    eprintln!("2 ranks vs 1 process after 20 steps: max |weight difference| = {diff:e}");
    assert!(diff <= 1e-5, "weights differ by {diff}");
    // Control: half the global batch in one process does not match.
    let half = tmp.path().join("half");
    check(
        "single process, half the batch",
        relora(&tiny_relora(half.to_str().unwrap(), "grad_accum=1"))
            .output()
            .unwrap(),
    );
    let control = max_weight_diff(&checkpoint_dir(&half, 20), &checkpoint_dir(&dp, 20));
    assert!(
        control > 1e-3,
        "the comparison cannot tell batches apart ({control})"
    );

    // Stop after 8 steps and resume on both ranks from rank 0's checkpoint.
    let mut first = tiny_relora(resumed_s, "grad_accum=1");
    first.extend(["--distributed", "mpi", "--stop-after", "8"]);
    check("first half", mpirun(2, &first).output().unwrap());
    let second = [
        "train",
        "--resume",
        resumed_s,
        "--eval-data",
        "none",
        "--threads",
        "1",
        "--quiet",
        "--distributed",
        "mpi",
    ];
    check("resumed half", mpirun(2, &second).output().unwrap());
    let diff = max_weight_diff(&checkpoint_dir(&dp, 20), &checkpoint_dir(&resumed, 20));
    eprintln!("resumed 2-rank run vs uninterrupted: max |weight difference| = {diff:e}");
    assert!(diff <= 1e-6, "resumed run differs by {diff}");
}

#[test]
fn the_relora_phase_reduces_under_30_percent_of_full_rank_bytes() {
    if !have_mpirun() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bytes");
    // The small preset: the projections hold ~96% of the parameters. Two full-rank steps, then
    // two in the ReLoRA phase.
    let args = [
        "train",
        "--preset",
        "small",
        "--mode",
        "relora",
        "--steps",
        "4",
        "--warmup-full-steps",
        "2",
        "--reset-every",
        "2",
        "--rank",
        "8",
        "--batch-size",
        "1",
        "--seq-len",
        "16",
        "--set",
        "warmup_steps=1",
        "--set",
        "restart_warmup_steps=1",
        "--eval-data",
        "none",
        "--threads",
        "1",
        "--quiet",
        "--distributed",
        "mpi",
        "--out",
        out.to_str().unwrap(),
    ];
    check("mpirun -np 2", mpirun(2, &args).output().unwrap());
    let lines = metrics(&out);
    let bytes = |adapters: bool| -> Vec<u64> {
        lines
            .iter()
            .filter(|l| l["adapters"] == adapters)
            .map(|l| l["reduced_bytes"].as_u64().unwrap())
            .collect()
    };
    let (full, relora) = (bytes(false), bytes(true));
    assert_eq!((full.len(), relora.len()), (2, 2));
    let params = relora::ModelConfig::preset("small").unwrap();
    let mut model = params;
    model.vocab_size = 258; // the byte tokenizer's
    assert_eq!(
        full[0],
        4 * model.num_parameters() as u64,
        "full rank reduces every weight"
    );
    let ratio = relora[0] as f64 / full[0] as f64;
    eprintln!(
        "reduced bytes per step: full rank {}, ReLoRA phase {} ({:.1}%)",
        full[0],
        relora[0],
        100.0 * ratio
    );
    assert!(
        ratio <= 0.30,
        "ReLoRA phase reduces {ratio:.3} of full rank's bytes"
    );
}

/// The PID of `mpirun`'s child process that is rank `rank`.
fn rank_pid(mpirun_pid: u32, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    let task_dir = format!("/proc/{mpirun_pid}/task");
    for task in std::fs::read_dir(task_dir).ok()?.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
                return Some(pid);
            }
        }
    }
    None
}

/// Starts a long 2-rank run, waits for it to train, and applies `signal` to rank 1. Returns how
/// long `mpirun` took to exit after that, and its output.
fn disturb_rank_one(signal: &str, extra: &[&str]) -> (Duration, Output) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("long");
    let mut args = tiny_relora(out.to_str().unwrap(), "grad_accum=1");
    let steps = args.iter().position(|a| *a == "20").unwrap();
    args[steps] = "100000";
    args.extend(["--distributed", "mpi", "--save-every", "0"]);
    args.extend(extra);
    let child = mpirun(2, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let metrics = out.join("metrics.jsonl");
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the run never trained"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let victim = rank_pid(child.id(), 1).expect("rank 1's process");
    let status = Command::new("kill")
        .args([signal, &victim.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let hit = Instant::now();
    // Wait in a thread so that a hang fails the test instead of blocking it.
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let _ = Command::new("kill")
                .args(["-9", &victim.to_string()])
                .status();
            panic!("mpirun still running 60 s after {signal} on rank 1");
        }
    };
    (hit.elapsed(), output)
}

#[test]
fn a_killed_rank_ends_the_job_with_an_error() {
    if !have_mpirun() {
        return;
    }
    let (took, out) = disturb_rank_one("-KILL", &[]);
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "mpirun exited {} {:.1} s after rank 1 was killed:\n{text}",
        out.status,
        took.as_secs_f64()
    );
    assert!(!out.status.success(), "mpirun succeeded:\n{text}");
    assert!(
        text.contains("signal 9") || text.contains("Killed") || text.contains("rank 1"),
        "no clear message:\n{text}"
    );
}

#[test]
fn a_hung_rank_ends_the_job_after_the_timeout() {
    if !have_mpirun() {
        return;
    }
    // A stopped process does not exit, so only the watchdog can end the job.
    let (took, out) = disturb_rank_one("-STOP", &["--dist-timeout", "3"]);
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!(
        "mpirun exited {} {:.1} s after rank 1 was stopped",
        out.status,
        took.as_secs_f64()
    );
    assert!(!out.status.success());
    assert!(
        text.contains("did not complete within 3 s"),
        "no clear message:\n{text}"
    );
}

/// `relora train --resume RUN` on 2 ranks, with a one-minute collective timeout.
fn resume_args(run: &Path) -> Vec<&str> {
    vec![
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--eval-data",
        "none",
        "--threads",
        "1",
        "--quiet",
        "--distributed",
        "mpi",
        "--dist-timeout",
        "60",
    ]
}

/// Resumes `run` on 2 ranks, checks that it continued from step `at` and left no hidden
/// entries, and returns how far its final weights are from `reference`'s.
fn resume_on_two_ranks(run: &Path, at: u64, reference: &Path) -> f32 {
    let out = check(
        "resumed job",
        mpirun(2, &resume_args(run)).output().unwrap(),
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains(&format!("at step {at}")),
        "did not resume at step {at}:\n{text}"
    );
    assert!(hidden_checkpoint_entries(run).is_empty());
    max_weight_diff(&checkpoint_dir(reference, 20), &checkpoint_dir(run, 20))
}

/// The arguments as string slices.
fn as_str(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Hidden names (`.step-N.tmp-PID` and the like) left in a run directory's checkpoints.
fn hidden_checkpoint_entries(run: &Path) -> Vec<String> {
    std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank() {
    if !have_mpirun() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    let dp = tmp.path().join("dp");
    // One process with rank 0's poisoned micro-batch, and two ranks where only rank 1's loss is
    // non-finite (its gradients stay finite): the same global step must be skipped in both.
    let mut args = tiny_relora(single.to_str().unwrap(), "grad_accum=2");
    args.extend(["--fault-nonfinite-loss", "0:7"]);
    check("single process", relora(&args).output().unwrap());
    let mut args = tiny_relora(dp.to_str().unwrap(), "grad_accum=1");
    // Ranks that disagree about the skip fall out of step in their collectives: the timeout
    // ends such a job in a minute instead of the default 15.
    args.extend([
        "--distributed",
        "mpi",
        "--fault-nonfinite-loss",
        "1:7",
        "--dist-timeout",
        "60",
    ]);
    check("mpirun -np 2", mpirun(2, &args).output().unwrap());

    let (ls, ld) = (metrics(&single), metrics(&dp));
    let skipped = |lines: &[serde_json::Value]| -> Vec<u64> {
        lines
            .iter()
            .filter(|l| l["skipped"] == true)
            .map(|l| l["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(skipped(&ls), [7], "the single process skipped other steps");
    assert_eq!(
        skipped(&ld),
        [7],
        "rank 0 did not skip rank 1's poisoned step"
    );
    // Every rank skipped it: had rank 1 alone skipped, the ranks' weights would differ from
    // here on, and so would the losses they average and rank 0's final weights.
    let applied = |lines: &[serde_json::Value]| -> Vec<f64> {
        lines
            .iter()
            .filter(|l| l["skipped"] != true)
            .map(|l| l["loss"].as_f64().unwrap())
            .collect()
    };
    let (a, b) = (applied(&ls), applied(&ld));
    assert_eq!(a.len(), 20);
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() < 1e-4, "applied step {i}: loss {x} vs {y}");
    }
    let diff = max_weight_diff(&checkpoint_dir(&single, 20), &checkpoint_dir(&dp, 20));
    eprintln!("poisoned rank: 2 ranks vs 1 process, max |weight difference| = {diff:e}");
    assert!(diff <= 1e-5, "weights differ by {diff}");
}

#[test]
fn a_kill_during_a_save_in_a_two_rank_run_resumes_every_rank_from_one_checkpoint() {
    if !have_mpirun() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference");
    let killed = tmp.path().join("killed");
    let dp_args = |out: &Path| -> Vec<String> {
        let mut a: Vec<String> = tiny_relora(out.to_str().unwrap(), "grad_accum=1")
            .into_iter()
            .map(String::from)
            .collect();
        a.extend(
            [
                "--distributed",
                "mpi",
                "--save-every",
                "4",
                "--dist-timeout",
                "60",
            ]
            .map(String::from),
        );
        a
    };
    check(
        "reference run",
        mpirun(2, &as_str(&dp_args(&reference))).output().unwrap(),
    );
    // Rank 0 kills itself (SIGKILL) part-way through the save of step 12.
    let mut args = dp_args(&killed);
    args.extend(["--fault-kill-in-save", "12"].map(String::from));
    let out = mpirun(2, &as_str(&args)).output().unwrap();
    assert!(!out.status.success(), "the killed job succeeded");
    let left = hidden_checkpoint_entries(&killed);
    assert!(
        left.iter().any(|n| n.starts_with(".step-00000012.tmp-")),
        "the kill did not land in the save of step 12: {left:?}"
    );
    assert!(checkpoint_dir(&killed, 8).join("manifest.json").exists());
    assert!(!checkpoint_dir(&killed, 12).exists());

    // Both ranks resume: rank 0 tidies the leftover before any rank picks the newest
    // checkpoint, so both continue from step 8 and end where the uninterrupted run did.
    let diff = resume_on_two_ranks(&killed, 8, &reference);
    eprintln!(
        "killed during a save and resumed vs uninterrupted: max |weight difference| = {diff:e}"
    );
    assert!(diff <= 1e-6, "resumed run differs by {diff}");

    // A kill between parking a checkpoint for replacement and renaming its successor in leaves
    // the newest checkpoint under its parked name: rank 0 restores it, and no rank may pick
    // an older checkpoint before it has.
    let parked = tmp.path().join("parked");
    let mut args = dp_args(&parked);
    args.extend(["--stop-after", "12"].map(String::from));
    check(
        "first 12 steps",
        mpirun(2, &as_str(&args)).output().unwrap(),
    );
    std::fs::rename(
        checkpoint_dir(&parked, 12),
        parked.join("checkpoints/.step-00000012.old-4242"),
    )
    .unwrap();
    let diff = resume_on_two_ranks(&parked, 12, &reference);
    assert!(diff <= 1e-6, "resumed run differs by {diff}");
}
