//! The `relora-convert` binary end to end: help text for every subcommand, each subcommand on a
//! synthetic checkpoint, and a non-zero exit with a message naming the problem on bad input.

use std::path::Path;
use std::process::{Command, Output};

fn convert(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relora-convert"))
        .args(args)
        .output()
        .expect("relora-convert runs")
}

fn ok(args: &[&str]) -> String {
    let out = convert(args);
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn fails(args: &[&str], needles: &[&str]) {
    let out = convert(args);
    // 1 for failures, 2 for usage errors (clap's convention).
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "{args:?} should fail, got {:?}",
        out.status
    );
    let err = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "expected '{n}' in: {err}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A synthetic checkpoint of the tiny preset with two completed phases at `ckpt`.
fn synth_tiny(ckpt: &Path) {
    ok(&[
        "synth",
        s(ckpt),
        "--preset",
        "tiny",
        "--vocab",
        "258",
        "--rank",
        "4",
        "--phases",
        "2",
    ]);
}

#[test]
fn every_subcommand_has_help() {
    let top = ok(&["--help"]);
    for cmd in ["merge", "inspect", "peft", "import", "spectrum", "synth"] {
        assert!(top.contains(cmd), "{top}");
        let help = ok(&[cmd, "--help"]);
        assert!(help.contains("Usage: relora-convert"), "{help}");
        assert!(help.lines().count() > 5, "{cmd}: {help}");
    }
    assert!(ok(&["merge", "--help"]).contains("--upto-phase"));
    assert!(ok(&["merge", "--help"]).contains("--max-shard-size"));
    assert!(ok(&["spectrum", "--help"]).contains("--against"));
}

#[test]
fn subcommands_work_on_a_synthetic_checkpoint_and_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ckpt = d.join("ckpt");
    synth_tiny(&ckpt);

    let info: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", s(&ckpt), "--json", "--verify"])).unwrap();
    assert_eq!(info["kind"], "checkpoint");
    assert_eq!(info["report"]["phases"].as_array().unwrap().len(), 2);
    assert!(ok(&["inspect", s(&ckpt)]).contains("2 completed phases"));

    let hf = d.join("hf");
    ok(&[
        "merge",
        s(&ckpt),
        s(&hf),
        "--tokenizer",
        "bytes",
        "--dtype",
        "bf16",
    ]);
    assert!(hf.join("model.safetensors").exists() && hf.join("tokenizer.json").exists());
    fails(
        &["merge", s(&ckpt), s(&hf)],
        &["already holds relora's model export", "--force"],
    );
    ok(&[
        "merge",
        s(&ckpt),
        s(&hf),
        "--force",
        "--max-shard-size",
        "100KB",
        "--tokenizer",
        "bytes",
    ]);
    assert!(hf.join("model.safetensors.index.json").exists());
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", s(&hf), "--json"])).unwrap();
    assert_eq!(info["kind"], "model_dir");
    assert!(info["report"]["files"].as_array().unwrap().len() > 1);
    let one = d.join("one.safetensors");
    ok(&["merge", s(&ckpt), s(&one), "--upto-phase", "1"]);
    assert!(ok(&["inspect", s(&one)]).contains("model.norm.weight"));
    fails(
        &["merge", s(&ckpt), s(&d.join("x")), "--upto-phase", "3"],
        &["phase 3", "2 completed phases"],
    );
    fails(
        &["merge", s(&ckpt), s(&d.join("y")), "--dtype", "int8"],
        &["int8"],
    );

    ok(&["peft", s(&ckpt), s(&d.join("peft"))]);
    assert!(
        d.join("peft/adapter_config.json").exists() && d.join("peft/base/config.json").exists()
    );

    let table = ok(&[
        "spectrum",
        s(&ckpt),
        "--png",
        s(&d.join("s.png")),
        "--against",
        s(&ckpt),
    ]);
    assert!(
        table.contains("self_attn.q_proj") && table.contains("run B"),
        "{table}"
    );
    assert!(d.join("s.png").exists());
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["spectrum", s(&ckpt), "--json"])).unwrap();
    assert_eq!(json[0]["modules"].as_array().unwrap().len(), 14);

    let imported = d.join("imported");
    ok(&[
        "import",
        s(&hf),
        s(&imported),
        "--set",
        "steps=100",
        "--set",
        "seq_len=64",
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", s(&imported), "--json", "--verify"])).unwrap();
    assert_eq!(info["report"]["tokenizer"], "bytes");
    fails(
        &["import", s(&hf), s(&d.join("bad")), "--set", "nonsense=1"],
        &["nonsense"],
    );

    // Corrupt input: non-zero exit, the file named, nothing written.
    let p = ckpt.join("base.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n - 3] ^= 1;
    std::fs::write(&p, b).unwrap();
    fails(
        &["merge", s(&ckpt), s(&d.join("z"))],
        &["base.safetensors", "checksum"],
    );
    assert!(!d.join("z").exists());
    fails(&["inspect", s(&d.join("nothing-here"))], &["nothing-here"]);
}

#[test]
fn force_replaces_only_relora_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ckpt = d.join("ckpt");
    synth_tiny(&ckpt);
    let user = d.join("user");
    std::fs::create_dir_all(user.join("sub")).unwrap();
    std::fs::write(user.join("notes.txt"), b"mine").unwrap();
    std::fs::write(user.join("sub/a.txt"), b"a").unwrap();
    let untouched = |p: &Path| {
        assert_eq!(std::fs::read(p.join("notes.txt")).unwrap(), b"mine");
        assert_eq!(std::fs::read(p.join("sub/a.txt")).unwrap(), b"a");
        assert_eq!(std::fs::read_dir(p).unwrap().count(), 2);
    };
    // A user's directory, with or without --force, for each command that writes one.
    for force in [false, true] {
        let mut runs = vec![
            vec!["merge", s(&ckpt), s(&user)],
            vec!["peft", s(&ckpt), s(&user)],
        ];
        for r in &mut runs {
            if force {
                r.push("--force");
            }
            fails(r, &["notes.txt", "nothing was changed"]);
            untouched(&user);
        }
    }
    // A checkpoint is not an export, and an export is not a checkpoint.
    let hf = d.join("hf");
    ok(&["merge", s(&ckpt), s(&hf), "--tokenizer", "bytes"]);
    fails(
        &["merge", s(&ckpt), s(&ckpt), "--force"],
        &["manifest.json", "nothing was changed"],
    );
    assert!(ckpt.join("manifest.json").exists());
    fails(
        &["import", s(&hf), s(&hf), "--force", "--set", "seq_len=64"],
        &["not a relora checkpoint", "nothing was changed"],
    );
    fails(
        &["import", s(&hf), s(&user), "--force", "--set", "seq_len=64"],
        &["notes.txt"],
    );
    untouched(&user);
    // relora's own outputs are replaced with --force: a directory, an import, a single file.
    ok(&["merge", s(&ckpt), s(&hf), "--force", "--dtype", "bf16"]);
    let imported = d.join("imported");
    for extra in [&[][..], &["--force"][..]] {
        let mut args = vec!["import", s(&hf), s(&imported), "--set", "seq_len=64"];
        args.extend_from_slice(extra);
        ok(&args);
    }
    let one = d.join("one.safetensors");
    ok(&["merge", s(&ckpt), s(&one)]);
    ok(&["merge", s(&ckpt), s(&one), "--force"]);
    let theirs = d.join("theirs.safetensors");
    std::fs::write(&theirs, b"someone else's weights").unwrap();
    fails(
        &["merge", s(&ckpt), s(&theirs), "--force"],
        &["theirs.safetensors", "nothing was changed"],
    );
    assert_eq!(std::fs::read(&theirs).unwrap(), b"someone else's weights");
    // A chart replaces an earlier chart, never another file.
    let png = d.join("s.png");
    ok(&["spectrum", s(&ckpt), "--png", s(&png)]);
    ok(&["spectrum", s(&ckpt), "--png", s(&png)]);
    let photo = d.join("photo.png");
    std::fs::write(&photo, b"\x89PNG\r\n\x1a\nmy holiday").unwrap();
    fails(
        &["spectrum", s(&ckpt), "--png", s(&photo)],
        &["photo.png", "not a chart relora wrote"],
    );
    assert_eq!(
        std::fs::read(&photo).unwrap(),
        b"\x89PNG\r\n\x1a\nmy holiday"
    );
    // Nothing hidden was left behind.
    let hidden: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}
