//! The converter on damaged checkpoints: every file of a checkpoint truncated at several lengths,
//! bit-flipped at several offsets, deleted, or swapped for the same file of another checkpoint.
//! Each case must exit non-zero with a message naming the damaged file, and write nothing: no
//! output and no temporary left beside it. `merge` and `peft` are checked on every file they read,
//! `inspect --verify` on every file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn convert(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relora-convert"))
        .args(args)
        .output()
        .expect("relora-convert runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn synth(dir: &Path, seed: &str) {
    let out = convert(&[
        "synth",
        s(dir),
        "--preset",
        "tiny",
        "--vocab",
        "258",
        "--rank",
        "4",
        "--phases",
        "2",
        "--seed",
        seed,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file of a checkpoint, relative to it.
fn files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(root, &p, out);
        } else {
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let mut rel = Vec::new();
    files(from, from, &mut rel);
    for r in rel {
        std::fs::create_dir_all(to.join(&r).parent().unwrap()).unwrap();
        std::fs::copy(from.join(&r), to.join(&r)).unwrap();
    }
}

/// A small deterministic generator for the damage offsets (no dependency needed).
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

#[test]
fn damaged_checkpoints_are_refused_naming_the_file_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    let other = tmp.path().join("other");
    synth(&good, "1");
    synth(&other, "2");
    let mut rel = Vec::new();
    files(&good, &good, &mut rel);
    rel.sort();
    assert!(rel.len() >= 4, "{rel:?}");

    let mut rng = Lcg(7);
    let mut cases = 0;
    let mut check = |label: &str, file: &Path, damage: &dyn Fn(&Path)| {
        let case = tmp.path().join(format!("case-{cases}"));
        cases += 1;
        copy_dir(&good, &case);
        damage(&case.join(file));
        let out_dir = tmp.path().join(format!("out-{cases}"));
        // merge and peft read every file but the optimizer state, which a model export does not
        // need; inspect --verify checks every file.
        let mut commands = vec![vec!["inspect", s(&case), "--verify"]];
        if !file.ends_with("optimizer.safetensors") {
            commands.push(vec!["merge", s(&case), s(&out_dir), "--tokenizer", "bytes"]);
            commands.push(vec!["peft", s(&case), s(&out_dir)]);
        }
        for args in commands {
            let out = convert(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{label} of {}: {args:?} should fail; stderr: {err}",
                file.display()
            );
            let name = file.file_name().unwrap().to_string_lossy();
            assert!(
                err.contains(&*name),
                "{label} of {}: the message should name the file: {err}",
                file.display()
            );
            assert!(!err.contains("panicked"), "{err}");
            let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(&format!("out-{cases}")) || n.contains(".tmp"))
                .collect();
            assert!(leftovers.is_empty(), "{label}: left behind {leftovers:?}");
        }
        std::fs::remove_dir_all(&case).unwrap();
    };

    for file in &rel {
        let len = std::fs::metadata(good.join(file)).unwrap().len() as usize;
        let mut cuts = vec![0, 1, 8, len / 2, len - 1];
        cuts.retain(|&c| c < len);
        cuts.dedup();
        for cut in cuts {
            check(&format!("truncation to {cut} bytes"), file, &|p: &Path| {
                let b = std::fs::read(p).unwrap();
                std::fs::write(p, &b[..cut]).unwrap();
            });
        }
        for _ in 0..4 {
            let at = rng.below(len);
            let bit = rng.below(8);
            check(&format!("bit flip at byte {at}"), file, &|p: &Path| {
                let mut b = std::fs::read(p).unwrap();
                b[at] ^= 1 << bit;
                std::fs::write(p, b).unwrap();
            });
        }
        check("deletion", file, &|p: &Path| {
            std::fs::remove_file(p).unwrap()
        });
        let foreign = other.join(file);
        // (The synthetic optimizer state is empty, the same in both.)
        if std::fs::read(&foreign).unwrap() != std::fs::read(good.join(file)).unwrap() {
            check("the same file of another checkpoint", file, &|p: &Path| {
                std::fs::copy(&foreign, p).unwrap();
            });
        }
    }
    eprintln!("{cases} damaged checkpoints refused ({} files)", rel.len());
}

/// Runs the converter, failing the test if it has not exited within 30 s (a read that waits on
/// a FIFO or never ends).
fn convert_in_time(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_relora-convert"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("relora-convert runs");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("relora-convert {args:?} still running after 30 s");
        }
    }
}

/// Replaces `path` with a FIFO (`None`) or a symlink to `target`.
#[cfg(unix)]
fn replace_with_special(path: &Path, target: Option<&str>) {
    std::fs::remove_file(path).unwrap();
    match target {
        Some(t) => std::os::unix::fs::symlink(t, path).unwrap(),
        None => {
            let ok = Command::new("mkfifo").arg(path).status().unwrap();
            assert!(ok.success(), "mkfifo {}", path.display());
        }
    }
}

#[cfg(unix)]
#[test]
fn files_that_are_not_regular_files_are_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    synth(&good, "1");
    let hf = tmp.path().join("hf");
    let out = convert(&["merge", s(&good), s(&hf), "--tokenizer", "bytes"]);
    assert!(out.status.success());
    let specials = [
        (Some("/dev/zero"), "character device"),
        (Some("/dev/urandom"), "character device"),
        (None, "FIFO"),
    ];
    let mut cases = 0;
    for file in [
        "manifest.json",
        "params.safetensors",
        "base.safetensors",
        "phases/phase-0001.safetensors",
    ] {
        for (i, (target, what)) in specials.iter().enumerate() {
            let ckpt = tmp
                .path()
                .join(format!("ck-{}-{i}", file.replace('/', "-")));
            copy_dir(&good, &ckpt);
            replace_with_special(&ckpt.join(file), *target);
            let name = Path::new(file).file_name().unwrap().to_str().unwrap();
            let out_dir = tmp.path().join("out");
            for args in [
                vec!["merge", s(&ckpt), s(&out_dir)],
                vec!["peft", s(&ckpt), s(&out_dir)],
                vec!["inspect", s(&ckpt), "--verify"],
            ] {
                let out = convert_in_time(&args);
                let err = String::from_utf8_lossy(&out.stderr);
                assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
                assert!(err.contains(name) && err.contains(what), "{args:?}: {err}");
                assert!(!out_dir.exists(), "{args:?} wrote {}", out_dir.display());
                cases += 1;
            }
        }
    }
    // The Hugging Face side, read by import and inspect.
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        for (i, (target, what)) in specials.iter().enumerate() {
            let dir = tmp.path().join(format!("hf-{file}-{i}"));
            copy_dir(&hf, &dir);
            replace_with_special(&dir.join(file), *target);
            let ckpt = tmp.path().join("imported");
            for args in [
                vec!["import", s(&dir), s(&ckpt), "--set", "seq_len=64"],
                vec!["inspect", s(&dir)],
            ] {
                if file == "tokenizer.json" && args[0] == "inspect" {
                    continue; // inspect reads the weights and config only
                }
                let out = convert_in_time(&args);
                let text = String::from_utf8_lossy(&out.stderr).to_string()
                    + &String::from_utf8_lossy(&out.stdout);
                assert!(
                    text.contains(file) && text.contains(what),
                    "{args:?}: {text}"
                );
                // inspect reports a model directory's unreadable config.json in its output.
                if !(args[0] == "inspect" && file == "config.json") {
                    assert_eq!(out.status.code(), Some(1), "{args:?}: {text}");
                }
                assert!(!ckpt.exists());
                cases += 1;
            }
        }
    }
    eprintln!("{cases} cases of files that are not regular files: all refused at once");
}
