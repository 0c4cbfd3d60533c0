//! Checkpoints: bit-exact resume through a save/load, atomic saves under injected failures, and
//! clear errors for corrupt, truncated or foreign checkpoint files.

mod common;

use candle_core::Device;
use common::{tiny, train_cfg, values};
use relora::checkpoint::save::save_with_fault;
use relora::checkpoint::{self, run_dir, SaveExtra};
use relora::config::Mode;
use relora::data::corpus::builtin_train_text;
use relora::optim::ResetMode;
use relora::run::{RunOptions, TrainRun};
use relora::{Error, Trainer};
use std::path::Path;

fn corpus_tokens(vocab: usize) -> Vec<u32> {
    builtin_train_text()
        .bytes()
        .take(20_000)
        .map(|b| b as u32 % vocab as u32)
        .collect()
}

fn new_run(out: &Path, steps: u64) -> TrainRun {
    let mut cfg = train_cfg(Mode::Relora, "f32");
    cfg.steps = steps;
    cfg.warmup_full_steps = 4;
    cfg.reset_every = 5;
    cfg.reset_mode = ResetMode::Random(0.9); // exercises the reset RNG across the resume
    cfg.lora_dropout = 0.1; // exercises the dropout RNG across the resume
    cfg.grad_accum = 2;
    let trainer = Trainer::new(&tiny(64), &cfg, &Device::Cpu).unwrap();
    let opts = RunOptions {
        out_dir: out.to_path_buf(),
        save_every: 0,
        keep_last: 0,
        eval_every: 0,
        eval_batches: 2,
        writer: true,
    };
    TrainRun::new(
        trainer,
        corpus_tokens(64),
        None,
        Some("bytes".into()),
        None,
        opts,
    )
    .unwrap()
}

/// Every tensor of a trainer, named: weights, adapters, optimizer moments.
fn snapshot(t: &Trainer) -> Vec<(String, Vec<f64>)> {
    let mut out: Vec<(String, Vec<f64>)> = t
        .model
        .weights()
        .iter()
        .map(|(n, w)| (n.clone(), values(w)))
        .collect();
    for p in t.model.projections() {
        if let Some(ad) = &p.adapter {
            out.push((format!("{}.A", p.name), values(ad.a.as_tensor())));
            out.push((format!("{}.B", p.name), values(ad.b.as_tensor())));
        }
    }
    for (n, s) in t.optimizer().states() {
        out.push((format!("{n}.m"), values(&s.exp_avg)));
        out.push((format!("{n}.v"), values(&s.exp_avg_sq)));
        out.push((format!("{n}.step"), vec![s.step as f64]));
    }
    out
}

#[test]
fn resume_is_bit_exact_across_merges_resets_and_dropout() {
    let dir = tempfile::tempdir().unwrap();
    // 2N steps in one go, N = 8: the switch at 4, merges at 9 and 14.
    let mut straight = new_run(&dir.path().join("a"), 16);
    straight.train_until(16, |_| true).unwrap();

    let mut first = new_run(&dir.path().join("b"), 16);
    first.train_until(8, |_| true).unwrap();
    drop(first);
    let resumed_dir = run_dir::resolve(&dir.path().join("b")).unwrap();
    assert!(resumed_dir.ends_with("step-00000008"));
    let opts = RunOptions {
        out_dir: dir.path().join("b"),
        save_every: 0,
        keep_last: 0,
        eval_every: 0,
        eval_batches: 2,
        writer: true,
    };
    let mut second =
        TrainRun::resume(&resumed_dir, &Device::Cpu, corpus_tokens(64), None, opts).unwrap();
    assert_eq!(second.trainer.step_count(), 8);
    second.train_until(16, |_| true).unwrap();

    assert_eq!(straight.trainer.phases().len(), 2);
    let (a, b) = (snapshot(&straight.trainer), snapshot(&second.trainer));
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(va == vb, "{na} differs after resume");
    }
    // The re-merged weights of the final checkpoint equal the live trainer's, bit for bit.
    let (loaded, _) = checkpoint::load(
        &run_dir::resolve(&dir.path().join("a")).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    assert!(
        snapshot(&loaded) == a,
        "reloaded checkpoint differs from the trainer that wrote it"
    );
}

#[test]
fn a_failed_save_leaves_previous_checkpoints_intact() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = new_run(&dir.path().join("r"), 12);
    run.train_until(6, |_| true).unwrap();
    let good = run_dir::resolve(&dir.path().join("r")).unwrap();
    let trainer = &run.trainer;
    for fail_after in 0..4 {
        // A new checkpoint that fails part-way: nothing appears.
        let target = dir.path().join("r/checkpoints/step-99999999");
        let err =
            save_with_fault(trainer, &target, &SaveExtra::default(), Some(fail_after)).unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert!(!target.exists());
        // Overwriting the existing checkpoint that fails part-way: the old one survives.
        save_with_fault(trainer, &good, &SaveExtra::default(), Some(fail_after)).unwrap_err();
        checkpoint::load(&good, &Device::Cpu).unwrap();
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("r/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        leftovers,
        vec!["step-00000006".to_string()],
        "temporary directories left behind"
    );
}

fn expect_checkpoint_error(dir: &Path, needle: &str) {
    match checkpoint::load(dir, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail ({needle})", dir.display()),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(needle), "expected '{needle}' in: {msg}");
            assert!(
                matches!(e, Error::Checkpoint { .. } | Error::Io { .. }),
                "{e:?}"
            );
        }
    }
}

#[test]
fn corrupt_truncated_and_foreign_checkpoints_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = new_run(&dir.path().join("r"), 12);
    run.train_until(7, |_| true).unwrap();
    let good = run_dir::resolve(&dir.path().join("r")).unwrap();
    let copy = |name: &str| {
        let to = dir.path().join(name);
        std::fs::create_dir_all(to.join("phases")).unwrap();
        for e in walk(&good) {
            let rel = e.strip_prefix(&good).unwrap();
            std::fs::copy(&e, to.join(rel)).unwrap();
        }
        to
    };

    let d = copy("truncated");
    let f = d.join("adapters.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    expect_checkpoint_error(&d, "truncated");

    let d = copy("bitflip");
    let f = d.join("optimizer.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&f, &bytes).unwrap();
    expect_checkpoint_error(&d, "checksum");

    let d = copy("nomanifest");
    std::fs::remove_file(d.join("manifest.json")).unwrap();
    expect_checkpoint_error(&d, "manifest");

    // The manifest's own checksum: one added digit (a scale 10x larger changes every merge),
    // a missing checksum file, and a damaged one are all refused.
    let d = copy("flipped");
    let text = std::fs::read_to_string(d.join("manifest.json")).unwrap();
    assert!(text.contains("\"lora_alpha\": "));
    std::fs::write(
        d.join("manifest.json"),
        text.replacen("\"lora_alpha\": ", "\"lora_alpha\": 1", 1),
    )
    .unwrap();
    expect_checkpoint_error(&d, "manifest.json does not match manifest.json.crc32");
    let d = copy("nocrc");
    std::fs::remove_file(d.join("manifest.json.crc32")).unwrap();
    expect_checkpoint_error(&d, "manifest.json.crc32 is missing");
    let d = copy("badcrc");
    std::fs::write(d.join("manifest.json.crc32"), b"zz\n").unwrap();
    expect_checkpoint_error(&d, "not a CRC-32");
    // Format version 1 had no checksum file and is still read.
    let d = copy("version1");
    let text = std::fs::read_to_string(d.join("manifest.json")).unwrap();
    std::fs::write(
        d.join("manifest.json"),
        text.replace("\"format_version\": 2", "\"format_version\": 1"),
    )
    .unwrap();
    std::fs::remove_file(d.join("manifest.json.crc32")).unwrap();
    checkpoint::load(&d, &Device::Cpu).unwrap();

    let d = copy("garbage");
    write_manifest(&d, b"{\"format\": 3");
    expect_checkpoint_error(&d, "unreadable manifest");

    let d = copy("future");
    let text = std::fs::read_to_string(d.join("manifest.json")).unwrap();
    write_manifest(
        &d,
        text.replace("\"format_version\": 2", "\"format_version\": 99")
            .as_bytes(),
    );
    expect_checkpoint_error(&d, "format version 99");

    let d = copy("missingfile");
    std::fs::remove_file(d.join("base.safetensors")).unwrap();
    expect_checkpoint_error(&d, "base.safetensors");

    // A header that is not safetensors at all but has the recorded size and checksum.
    let d = copy("badheader");
    let f = d.join("params.safetensors");
    let len = std::fs::metadata(&f).unwrap().len() as usize;
    let mut junk = vec![0xffu8; len];
    junk[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&f, &junk).unwrap();
    let text = std::fs::read_to_string(d.join("manifest.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["files"]["params.safetensors"]["crc32"] = crc32fast::hash(&junk).into();
    write_manifest(&d, serde_json::to_string(&m).unwrap().as_bytes());
    expect_checkpoint_error(&d, "not a valid safetensors file");

    // The original is still fine.
    checkpoint::load(&good, &Device::Cpu).unwrap();
}

/// Replaces a checkpoint's manifest and its checksum file, as a deliberate edit would.
/// Files of a checkpoint replaced by a FIFO, `/dev/zero` or `/dev/urandom`: the loader used to
/// block on the FIFO or read the endless stream; now each is refused at once, the file named.
#[cfg(unix)]
#[test]
fn files_that_are_not_regular_files_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = new_run(&dir.path().join("r"), 12);
    run.train_until(11, |_| true).unwrap();
    let good = run_dir::resolve(&dir.path().join("r")).unwrap();
    let mut cases = 0;
    for file in [
        "manifest.json",
        "manifest.json.crc32",
        "params.safetensors",
        "base.safetensors",
        "adapters.safetensors",
        "optimizer.safetensors",
        "phases/phase-0001.safetensors",
    ] {
        for special in ["fifo", "/dev/zero", "/dev/urandom"] {
            let d = dir
                .path()
                .join(format!("{}-{cases}", file.replace('/', "-")));
            std::fs::create_dir_all(d.join("phases")).unwrap();
            for e in walk(&good) {
                let rel = e.strip_prefix(&good).unwrap();
                std::fs::copy(&e, d.join(rel)).unwrap();
            }
            let target = d.join(file);
            std::fs::remove_file(&target).unwrap();
            if special == "fifo" {
                let c = std::ffi::CString::new(target.to_str().unwrap()).unwrap();
                // SAFETY: a valid NUL-terminated path.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            } else {
                std::os::unix::fs::symlink(special, &target).unwrap();
            }
            let started = std::time::Instant::now();
            let name = Path::new(file).file_name().unwrap().to_str().unwrap();
            match checkpoint::load(&d, &Device::Cpu) {
                Ok(_) => panic!("{file} as {special} was loaded"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(matches!(e, Error::Checkpoint { .. }), "{file}: {e:?}");
                    assert!(
                        msg.contains(name) && msg.contains("not a regular file"),
                        "{msg}"
                    );
                }
            }
            assert!(started.elapsed().as_secs() < 10, "{file} as {special}");
            cases += 1;
        }
    }
    // A checkpoint path that is a regular file, or nothing at all.
    let f = dir.path().join("file.txt");
    std::fs::write(&f, b"x").unwrap();
    expect_checkpoint_error(&f, "not a checkpoint directory");
    expect_checkpoint_error(&dir.path().join("nothing"), "does not exist");
    assert_eq!(cases, 21);
}

fn write_manifest(dir: &Path, bytes: &[u8]) {
    std::fs::write(dir.join("manifest.json"), bytes).unwrap();
    let crc = format!("{:08x}", crc32fast::hash(bytes));
    std::fs::write(dir.join("manifest.json.crc32"), crc).unwrap();
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
