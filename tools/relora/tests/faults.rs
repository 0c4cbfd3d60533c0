//! Faults the `relora` program must survive: SIGKILL at random moments (inside a step, a merge,
//! a save or a prune) followed by `--resume`, and a disk that fills up during a save.
//!
//! `RELORA_FAULT_SEED=N` replays the kill schedule with another seed (the moments still depend
//! on the machine's speed).

use relora::checkpoint::{self, files::safetensors_bytes, run_dir};
use relora::device::parse_device;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_relora");

/// The killed runs: 96 steps, full rank for 8, then a merge every 8 steps (11 merges), a
/// checkpoint every 3 steps, the last 2 kept.
const STEPS: u64 = 96;
const WARM_START: u64 = 8;
const RESET_EVERY: u64 = 8;

fn kill_run_args(out: &Path) -> Vec<String> {
    let s = |v: &str| v.to_string();
    let mut v: Vec<String> = [
        "train",
        "--preset",
        "tiny",
        "--mode",
        "relora",
        "--batch-size",
        "8",
        "--seq-len",
        "64",
        "--rank",
        "4",
        "--save-every",
        "3",
        "--keep-last",
        "2",
        "--eval-every",
        "0",
        "--eval-batches",
        "1",
        "--threads",
        "1",
        "--quiet",
        "--set",
        "reset_mode=random:0.9",
        "--set",
        "lora_dropout=0.1",
        "--set",
        "warmup_steps=2",
        "--set",
        "restart_warmup_steps=2",
    ]
    .map(s)
    .to_vec();
    v.extend([
        s("--steps"),
        STEPS.to_string(),
        s("--warmup-full-steps"),
        WARM_START.to_string(),
        s("--reset-every"),
        RESET_EVERY.to_string(),
        s("--out"),
        out.display().to_string(),
    ]);
    v
}

/// splitmix64: a seeded schedule without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn spawn(args: &[String], log: &Path) -> Child {
    Command::new(BIN)
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .expect("starting relora")
}

/// Waits up to `limit` for the child; `None` if it is still running.
fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        let now = Instant::now();
        if now >= end {
            return None;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(2)));
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Every visible `step-*` directory must load completely (all sizes and CRCs verified, phases
/// re-merged) and hold the step its name says. Returns the failures.
fn unloadable(run: &Path) -> Vec<String> {
    let cpu = parse_device("cpu").unwrap();
    let dir = run.join("checkpoints");
    let mut bad = Vec::new();
    for name in entries(&dir) {
        let Some(step) = name.strip_prefix("step-") else {
            continue;
        };
        let path = dir.join(&name);
        match checkpoint::load(&path, &cpu) {
            Ok((_, m)) if step.parse::<u64>().ok() == Some(m.counters.step) => {}
            Ok((_, m)) => bad.push(format!("{name}: holds step {}", m.counters.step)),
            Err(e) => bad.push(format!("{name}: {e}")),
        }
    }
    bad
}

/// The files of a directory tree, relative path -> bytes.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Files that differ (or exist on one side only) between two checkpoint directories.
fn differing_files(a: &Path, b: &Path) -> Vec<String> {
    let (ta, tb) = (tree(a), tree(b));
    let mut out = Vec::new();
    for (rel, bytes) in &ta {
        if tb.get(rel) != Some(bytes) {
            out.push(format!("{}/{}", b.display(), rel.display()));
        }
    }
    for rel in tb.keys().filter(|r| !ta.contains_key(*r)) {
        out.push(format!("{}/{} (extra)", b.display(), rel.display()));
    }
    out
}

/// The deterministic part of each metrics line (everything but timings and throughput).
fn trajectory(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("torn metrics line {l:?}: {e}"));
            let o = v.as_object_mut().unwrap();
            o.remove("timings");
            o.remove("tokens_per_s");
            v.to_string()
        })
        .collect()
}

/// The final checkpoint's weights (adapters merged), each serialised, by name.
fn final_weights(run: &Path) -> BTreeMap<String, Vec<u8>> {
    let dir = run_dir::resolve(run).unwrap();
    let (trainer, _) = checkpoint::load(&dir, &parse_device("cpu").unwrap()).unwrap();
    trainer
        .merged_weights()
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let bytes = safetensors_bytes(&[(n.clone(), t)]).unwrap();
            (n, bytes)
        })
        .collect()
}

/// Hidden leftovers (`.step-*.tmp-PID`, `.old-`, `.del-`) of process `pid`, if given, else all.
fn leftovers(run: &Path, pid: Option<u32>) -> Vec<String> {
    entries(&run.join("checkpoints"))
        .into_iter()
        .filter(|n| n.starts_with(".step-"))
        .filter(|n| match pid {
            Some(p) => n.ends_with(&format!("-{p}")),
            None => true,
        })
        .collect()
}

/// The step the trainer was working on when killed: one past the last logged step (the log line
/// goes out before that step's checkpoint), or one past the checkpoint it started from.
fn step_in_progress(run: &Path, started_at: u64) -> u64 {
    let last = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .next_back()
        .unwrap_or(0);
    last.max(started_at) + 1
}

/// Whether step `t` (1-based) starts with the switch to adapters or a ReLoRA merge.
fn merges_before(t: u64) -> bool {
    let c = t - 1; // the trainer's step counter while it prepares step t
    c >= WARM_START && (c - WARM_START).checked_rem(RESET_EVERY) == Some(0)
}

#[derive(Default, Debug)]
struct Tally {
    runs: usize,
    kills: usize,
    in_save: usize,
    in_prune_or_replace: usize,
    in_merge_step: usize,
    in_other_step: usize,
    before_first_step: usize,
    at_end: usize,
    resumes: usize,
    fresh_restarts: usize,
    leftovers_seen: usize,
    unloadable: Vec<String>,
    mismatches: Vec<String>,
}

#[test]
fn kill_nine_at_random_moments_then_resume_is_bit_exact() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let seed = std::env::var("RELORA_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_240_601u64);
    let mut rng = Rng(seed);

    // The uninterrupted reference, timed to spread the kills over a run's length.
    let reference = tmp.path().join("reference");
    let t0 = Instant::now();
    let st = spawn(
        &kill_run_args(&reference),
        &tmp.path().join("reference.log"),
    )
    .wait()
    .unwrap();
    let t_ref = t0.elapsed().as_secs_f64();
    assert!(
        st.success(),
        "reference run failed:\n{}",
        std::fs::read_to_string(tmp.path().join("reference.log")).unwrap()
    );
    let ref_ckpts = entries(&reference.join("checkpoints"));
    let ref_traj = trajectory(&reference);
    assert_eq!(ref_traj.len() as u64, STEPS);
    let ref_weights = final_weights(&reference);

    const MIN_KILLS: usize = 24;
    const MIN_RUNS: usize = 3;
    // Generous: the kills per run fall when the machine is loaded unevenly (the reference run
    // then calibrates the delays badly), and the loop stops as soon as the quota is met.
    const MAX_RUNS: usize = 30;
    const MAX_KILLS_PER_RUN: usize = 12;
    let mut t = Tally::default();
    // Enough kills and runs, and (time permitting) at least one kill inside a save and one in a
    // merging step.
    while (t.kills < MIN_KILLS || t.runs < MIN_RUNS || t.in_save == 0 || t.in_merge_step == 0)
        && t.runs < MAX_RUNS
    {
        t.runs += 1;
        let out = tmp.path().join(format!("run-{}", t.runs));
        // Every attempt but the last ends in a kill.
        for attempt in 0usize.. {
            let newest = run_dir::list(&out).unwrap().pop().map(|(s, _)| s);
            let mut args = kill_run_args(&out);
            if newest.is_some() {
                args.extend(["--resume".to_string(), out.display().to_string()]);
            }
            let log = tmp.path().join(format!("run-{}-{attempt}.log", t.runs));
            let metrics_before = std::fs::read(out.join("metrics.jsonl")).unwrap_or_default();
            let mut child = spawn(&args, &log);
            let pid = child.id();
            let limit = if attempt < MAX_KILLS_PER_RUN {
                Duration::from_secs_f64(rng.range(0.0, t_ref / 3.0))
            } else {
                Duration::from_secs(600)
            };
            if let Some(st) = wait_for(&mut child, limit) {
                assert!(
                    st.success(),
                    "run {} attempt {attempt} failed:\n{}",
                    t.runs,
                    std::fs::read_to_string(&log).unwrap()
                );
                break;
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            t.kills += 1;
            let mine = leftovers(&out, Some(pid));
            if mine.iter().any(|n| n.contains(".tmp-")) {
                t.in_save += 1;
            } else if !mine.is_empty() {
                t.in_prune_or_replace += 1;
            } else if metrics_before
                .starts_with(&std::fs::read(out.join("metrics.jsonl")).unwrap_or_default())
            {
                // The log is as before (or cut back by the resume): no step completed yet.
                t.before_first_step += 1;
            } else {
                let step = step_in_progress(&out, newest.unwrap_or(0));
                if step > STEPS {
                    t.at_end += 1;
                } else if merges_before(step) {
                    t.in_merge_step += 1;
                } else {
                    t.in_other_step += 1;
                }
            }
            t.leftovers_seen += leftovers(&out, None).len();
            t.unloadable.extend(
                unloadable(&out)
                    .into_iter()
                    .map(|e| format!("run {} kill {}: {e}", t.runs, attempt + 1)),
            );
            if run_dir::list(&out).unwrap().is_empty() {
                t.fresh_restarts += 1;
            } else {
                t.resumes += 1;
            }
        }

        // The finished run: no leftovers, the same checkpoints, files, log and weights.
        let left = leftovers(&out, None);
        assert!(left.is_empty(), "run {}: leftovers {left:?}", t.runs);
        let ckpts = entries(&out.join("checkpoints"));
        if ckpts != ref_ckpts {
            t.mismatches.push(format!(
                "run {}: checkpoints {ckpts:?}, reference {ref_ckpts:?}",
                t.runs
            ));
        }
        for name in ckpts.iter().filter(|n| ref_ckpts.contains(n)) {
            t.mismatches.extend(differing_files(
                &reference.join("checkpoints").join(name),
                &out.join("checkpoints").join(name),
            ));
        }
        let traj = trajectory(&out);
        if traj != ref_traj {
            let first = traj.iter().zip(&ref_traj).position(|(a, b)| a != b);
            t.mismatches.push(format!(
                "run {}: metrics log differs ({} lines vs {}, first difference at line {first:?})",
                t.runs,
                traj.len(),
                ref_traj.len()
            ));
        }
        if final_weights(&out) != ref_weights {
            t.mismatches
                .push(format!("run {}: final merged weights differ", t.runs));
        }
    }

    println!(
        "kill -9 summary: seed {seed}, reference run {t_ref:.2} s, {} runs, {} kills \
         (inside a save {}, inside a prune/replace {}, in a merging step {}, in another step {}, \
         during startup or the first step {}, at the end {}), {} resumes, {} fresh restarts, {} leftover dirs seen after kills, \
         {} unloadable checkpoints, {} mismatches, {:.1} s",
        t.runs,
        t.kills,
        t.in_save,
        t.in_prune_or_replace,
        t.in_merge_step,
        t.in_other_step,
        t.before_first_step,
        t.at_end,
        t.resumes,
        t.fresh_restarts,
        t.leftovers_seen,
        t.unloadable.len(),
        t.mismatches.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(t.unloadable.is_empty(), "unloadable: {:#?}", t.unloadable);
    assert!(t.mismatches.is_empty(), "mismatches: {:#?}", t.mismatches);
    assert!(t.kills >= 20, "only {} kills", t.kills);
}

fn disk_run_args(out: &Path) -> Vec<String> {
    [
        "train",
        "--preset",
        "tiny",
        "--mode",
        "full",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--save-every",
        "1",
        "--eval-every",
        "0",
        "--eval-batches",
        "1",
        "--threads",
        "1",
        "--quiet",
        "--set",
        "warmup_steps=1",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.display().to_string()])
    .collect()
}

/// Bytes a directory tree takes on a tmpfs (whole pages per file).
fn pages_bytes(dir: &Path) -> u64 {
    tree(dir)
        .values()
        .map(|b| (b.len() as u64).div_ceil(4096) * 4096)
        .sum()
}

/// A private mount namespace in which mounting a tmpfs works: `unshare -m` as root, or
/// `unshare -rm` through a user namespace. `Err` says why there is none.
fn mount_namespace(probe_dir: &Path) -> Result<Vec<&'static str>, String> {
    let mut why = Vec::new();
    for ns in [vec!["unshare", "-m"], vec!["unshare", "-rm"]] {
        let out = Command::new(ns[0])
            .args(&ns[1..])
            .args(["sh", "-c", "mount -t tmpfs -o size=64k tmpfs \"$0\""])
            .arg(probe_dir)
            .output();
        match out {
            Ok(o) if o.status.success() => return Ok(ns),
            Ok(o) => why.push(format!(
                "{}: {}",
                ns.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => why.push(format!("{}: {e}", ns.join(" "))),
        }
    }
    Err(why.join("; "))
}

/// Inside the namespace: a tmpfs of $SIZE bytes with $FILLER bytes taken; train until the disk is
/// full; copy the run out; free the filler; resume; copy the run out again.
const DISK_FULL_SCRIPT: &str = r#"
set -u
BIN=$1 MNT=$2 HOST=$3 SIZE=$4 FILLER=$5
shift 5
mount -t tmpfs -o size=$SIZE tmpfs "$MNT" || exit 90
head -c "$FILLER" /dev/zero > "$MNT/filler" || exit 91
"$BIN" "$@" --out "$MNT/run" 2> "$HOST/full.err"
echo $? > "$HOST/full.rc"
cp -a "$MNT/run" "$HOST/after-full" || exit 92
rm "$MNT/filler"
"$BIN" "$@" --out "$MNT/run" --resume "$MNT/run" 2> "$HOST/resume.err"
echo $? > "$HOST/resume.rc"
cp -a "$MNT/run" "$HOST/final" || exit 93
"#;

#[test]
fn disk_full_during_save_keeps_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ns = match mount_namespace(&mnt) {
        Ok(ns) => ns,
        Err(why) => {
            println!("disk-full test SKIPPED: cannot mount a tmpfs here ({why})");
            return;
        }
    };

    // The reference, on the real disk, keeping every checkpoint.
    let reference = tmp.path().join("reference");
    let mut args = disk_run_args(&reference);
    args.extend(["--keep-last".into(), "0".into()]);
    let st = Command::new(BIN).args(&args).output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let ck = |run: &Path, s: u64| run_dir::checkpoint_dir(run, s);
    let one = pages_bytes(&ck(&reference, 1));
    assert_eq!(
        one,
        pages_bytes(&ck(&reference, 2)),
        "checkpoint sizes vary"
    );
    // Room for the first checkpoint but not a second; after the filler goes, room for the two
    // kept checkpoints plus the one being written.
    let size = 4 * one + (256 << 10);
    let filler = 5 * one / 2;

    // Train with --keep-last 2 on the tmpfs (`--out` and `--resume` come from the script).
    let mut args = disk_run_args(Path::new("unused"));
    args.truncate(args.len() - 2);
    args.extend(["--keep-last".into(), "2".into()]);
    let host = tmp.path();
    let out = Command::new(ns[0])
        .args(&ns[1..])
        .args(["sh", "-c", DISK_FULL_SCRIPT, "sh", BIN])
        .arg(&mnt)
        .arg(host)
        .args([size.to_string(), filler.to_string()])
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "script failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |f: &str| std::fs::read_to_string(host.join(f)).unwrap();

    // The full disk: a non-zero exit with a message naming the cause, the file and the way on.
    let err = read("full.err");
    println!(
        "disk-full run: exit {}; stderr:\n{err}",
        read("full.rc").trim()
    );
    assert_ne!(read("full.rc").trim(), "0", "the run should fail:\n{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains(".safetensors"),
        "the file is not named:\n{err}"
    );
    assert!(err.contains("step-00000002"), "{err}");
    assert!(err.contains("--resume"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // The previous checkpoint is intact (loads with every CRC checked, equals the reference
    // byte for byte) and nothing partial is left: no step-2, no temporary directory.
    let after = host.join("after-full");
    assert_eq!(entries(&after.join("checkpoints")), ["step-00000001"]);
    assert!(unloadable(&after).is_empty(), "{:?}", unloadable(&after));
    assert_eq!(
        differing_files(&ck(&reference, 1), &ck(&after, 1)),
        Vec::<String>::new()
    );

    // After freeing space, the resumed run completes and matches the reference.
    let resume_err = read("resume.err");
    assert_eq!(
        read("resume.rc").trim(),
        "0",
        "resume failed:\n{resume_err}"
    );
    let fin = host.join("final");
    assert_eq!(
        entries(&fin.join("checkpoints")),
        ["step-00000003", "step-00000004"]
    );
    for s in [3, 4] {
        assert_eq!(
            differing_files(&ck(&reference, s), &ck(&fin, s)),
            Vec::<String>::new()
        );
    }
    assert_eq!(trajectory(&fin), trajectory(&reference));
    println!(
        "disk-full summary: tmpfs {size} bytes, {filler} taken, checkpoint {one} bytes; save of \
         step 2 failed cleanly, step 1 intact, resume after freeing space completed bit-exact"
    );
}
