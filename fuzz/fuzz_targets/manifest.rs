//! Checkpoint manifests: the input is `manifest.json` (its checksum file written to match) of a
//! checkpoint directory whose other files are a real (tiny) checkpoint written by the trainer
//! (`fuzz/fixtures/checkpoint`), so a manifest that keeps the sizes and checksums gets through to
//! the header checks, the streaming export source and the full load into a trainer.
//!
//! Must hold: no panic, no hang, no allocation beyond what the files on disk justify (libFuzzer's
//! -rss_limit_mb / -malloc_limit_mb catch those), and every error has a message.

#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use relora::checkpoint::manifest::{MANIFEST_CHECKSUM_FILE, MANIFEST_FILE};
use relora::checkpoint::{self, Manifest};
use relora::analysis::inspect::inspect;
use relora::checkpoint::source::CheckpointSource;
use relora_fuzz::{check_err, scratch_dir};
use std::path::Path;
use std::sync::OnceLock;

macro_rules! fixture {
    ($rel:literal) => {
        (
            $rel,
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/fixtures/checkpoint/",
                $rel
            ))
            .as_slice(),
        )
    };
}

const FILES: &[(&str, &[u8])] = &[
    fixture!("params.safetensors"),
    fixture!("base.safetensors"),
    fixture!("adapters.safetensors"),
    fixture!("optimizer.safetensors"),
    fixture!("phases/phase-0001.safetensors"),
    fixture!("phases/phase-0002.safetensors"),
];

/// The scratch directory holding the fixture checkpoint's files (written once).
fn dir() -> &'static Path {
    static READY: OnceLock<()> = OnceLock::new();
    let d = scratch_dir();
    READY.get_or_init(|| {
        std::fs::create_dir_all(d.join("phases")).expect("phases dir");
        for (rel, bytes) in FILES {
            std::fs::write(d.join(rel), bytes).expect("fixture");
        }
    });
    d
}

fuzz_target!(|data: &[u8]| {
    let dir = dir();
    std::fs::write(dir.join(MANIFEST_FILE), data).expect("write manifest");
    // The checksum a writer records beside the manifest, so every format version gets through
    // to the parser (a damaged checksum file is an error before parsing; that is not fuzzed).
    let crc = format!("{:08x}", crc32fast::hash(data));
    std::fs::write(dir.join(MANIFEST_CHECKSUM_FILE), crc).expect("write checksum");

    let Some(m) = check_err(Manifest::read(dir)) else {
        return;
    };
    for rel in m.files.keys() {
        check_err(m.file(dir, rel));
    }
    // The header-only report and the verified one, as `relora-convert inspect` prints them.
    for verify in [false, true] {
        if let Some(report) = check_err(inspect(dir, verify)) {
            let _ = report.to_text();
            let _ = serde_json::to_string(&report);
        }
    }
    // The streaming export source: every tensor of the model, merged as an export would.
    if let Some(src) = check_err(CheckpointSource::open(dir)) {
        for (name, _) in src.expected() {
            check_err(src.weight(name));
        }
        for n in [None, Some(0), Some(1), Some(usize::MAX)] {
            check_err(src.resolve_upto(n));
        }
    }
    // The trainer's own loader.
    check_err(checkpoint::load(dir, &Device::Cpu));
});
