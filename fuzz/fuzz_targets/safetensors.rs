//! Safetensors files as the project reads them: the input is written to a file and opened with
//! the streaming reader of the converter and `inspect` (header checks, then every tensor mapped,
//! windowed, loaded and converted), and parsed by the checkpoint loader's in-memory reader.
//!
//! Must hold: no panic, no hang, no allocation beyond the file's size (a header that claims a
//! 1 TB tensor is an error, not an allocation), a mapped tensor is exactly its claimed size, and
//! every error has a message.

#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use relora::checkpoint::files::parse_tensors;
use relora::tensor_file::dtype::{convert_into, StDType};
use relora::analysis::inspect::{inspect, Inspection};
use relora::tensor_file::safetensors::SafetensorsFile;
use relora_fuzz::{check_err, scratch_dir};

fuzz_target!(|data: &[u8]| {
    let path = &scratch_dir().join("input.safetensors");
    std::fs::write(path, data).expect("write input");

    // The checkpoint loader's reader (candle over the safetensors crate), on the bytes.
    check_err(parse_tensors(path, data, &Device::Cpu));

    if let Some(Inspection::File { report, .. }) = check_err(inspect(path, false)) {
        assert_eq!(report.bytes, data.len() as u64);
    }

    let Some(f) = check_err(SafetensorsFile::open(path)) else {
        return;
    };
    assert_eq!(f.len(), data.len() as u64);
    let _ = f.metadata();
    let mut total = 0u64;
    for t in f.tensors_in_file_order() {
        let name = t.name.clone();
        assert_eq!(f.info(&name).expect("listed").bytes(), t.bytes());
        total += t.bytes();
        // A tiled header never claims more data than the file holds.
        assert!(
            total <= data.len() as u64,
            "{name} runs past the end of the file"
        );
        let mapped = f.map(&name).expect("a checked tensor maps");
        assert_eq!(mapped.len() as u64, t.bytes());
        let mut seen = 0u64;
        f.for_each_window(&name, |w| {
            seen += w.len() as u64;
            Ok(())
        })
        .expect("windows");
        assert_eq!(seen, t.bytes());
        check_err(f.tensor(&name));
        check_err(f.scalar_f64(&name));
        for to in [StDType::F32, StDType::BF16, StDType::F64] {
            let mut out = Vec::new();
            if check_err(convert_into(&mapped, t.dtype, to, &mut out)).is_some() {
                assert_eq!(out.len(), t.numel() * to.size());
            }
        }
    }
    let _ = f.names();
    check_err(f.info("no such tensor"));
});
