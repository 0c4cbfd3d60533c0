//! Exports checked by the real consumers, in Python: transformers loads every export with no
//! missing, unexpected or mismatched keys and computes our logits within 1e-5 relative; its
//! `AutoTokenizer` encodes and decodes like our tokenizers; peft's `merge_and_unload()` of the
//! adapter export equals our merge; and a Llama saved by transformers imports, re-exports exactly
//! and runs in our model with transformers' logits.
//!
//! llama.cpp's own converter turns the export into GGUF, and llama-cpp-python runs it with our
//! logits and tokenization.
//!
//! These tests need a Python with torch, transformers, safetensors and peft, named by the
//! environment variable `RELORA_PYTHON` (e.g. `/work/venv-hf/bin/python`); the llama.cpp check
//! also needs `gguf` and `llama-cpp-python` there and `RELORA_LLAMA_CONVERT` naming llama.cpp's
//! `convert_hf_to_gguf.py` (`.ci/run` sets all of this up). Without them each test prints a SKIP
//! line and passes.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{random_batch, tiny, train_cfg};
use relora::checkpoint::{self, SaveExtra};
use relora::config::{Mode, ModelConfig};
use relora::data::tokenizer::Tokenizer;
use relora::export::peft::write_peft;
use relora::export::{merge_checkpoint, write_model_dir, ExportDType, HfExportOptions};
use relora::import::{import_hf, HfWeights, ImportOptions};
use relora::model::Llama;
use relora::rng::Rng;
use relora::Trainer;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python to run, or `None` (after printing why) when the checks are not configured.
fn python(test: &str) -> Option<PathBuf> {
    match std::env::var_os("RELORA_PYTHON") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            println!(
                "SKIP {test}: set RELORA_PYTHON to a python with torch, transformers, \
                 safetensors and peft to run the consumer checks"
            );
            None
        }
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// Runs a check script; returns its JSON report (the last stdout line), failing the test with
/// the script's output if it exits non-zero.
fn run_py(py: &Path, args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let out = Command::new(py)
        .args(args)
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", py.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{:?} failed ({}):\n{stdout}\n{stderr}",
        args,
        out.status
    );
    let last = stdout.lines().last().unwrap_or("null");
    println!("{last}");
    serde_json::from_str(last).unwrap_or(serde_json::Value::Null)
}

fn os(s: &(impl AsRef<std::ffi::OsStr> + ?Sized)) -> &std::ffi::OsStr {
    s.as_ref()
}

/// A tiny ReLoRA run (three merges and a trained current adapter), saved with the byte tokenizer.
fn trained(dir: &Path, tie: bool) -> (Trainer, PathBuf) {
    let mut cfg = train_cfg(Mode::Relora, "f32");
    cfg.steps = 22;
    let mut model = tiny(258);
    model.tie_word_embeddings = tie;
    let mut t = Trainer::new(&model, &cfg, &Device::Cpu).unwrap();
    for s in 0..22 {
        t.step(&[random_batch(2, 8, 258, s)]).unwrap();
    }
    assert_eq!(t.phases().len(), 3);
    let ckpt = dir.join(if tie { "ckpt-tied" } else { "ckpt" });
    let extra = SaveExtra {
        data: None,
        tokenizer: Some("bytes".into()),
        host_state: None,
    };
    checkpoint::save(&t, &ckpt, &extra).unwrap();
    (t, ckpt)
}

/// Logits of a plain Llama holding `weights`, for `ids [b, t]`.
fn forward(cfg: &ModelConfig, weights: &HashMap<String, Tensor>, ids: &Tensor) -> Tensor {
    let mut m = Llama::new(cfg, DType::F32, &Device::Cpu, &mut Rng::new(0)).unwrap();
    m.load_weights(weights, true).unwrap();
    m.forward(ids, None).unwrap()
}

fn random_ids(vocab: usize, seed: u64) -> Tensor {
    let b = random_batch(2, 24, vocab, seed);
    Tensor::from_vec(b.inputs, (2, 24), &Device::Cpu).unwrap()
}

/// Writes `input_ids` (i64) and `logits` (f32) for the Python side.
fn write_reference(path: &Path, ids: &Tensor, logits: &Tensor) {
    let map = HashMap::from([
        ("input_ids".to_string(), ids.to_dtype(DType::I64).unwrap()),
        ("logits".to_string(), logits.to_dtype(DType::F32).unwrap()),
    ]);
    candle_core::safetensors::save(&map, path).unwrap();
}

fn tokenizer_cases(tok: &Tokenizer, path: &Path) {
    let texts = [
        "Hello world",
        "Grüße, naïve café ✓ — 東京 🚀",
        "  leading spaces\tand tabs\n\nnew paragraph ",
        "it's 1234567 3.14159!",
    ];
    let cases: Vec<serde_json::Value> = texts
        .iter()
        .map(|t| serde_json::json!({"text": t, "ids": tok.encode(t).unwrap()}))
        .collect();
    let v = serde_json::json!({"cases": cases, "vocab_size": tok.vocab_size()});
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn check_model(py: &Path, dir: &Path, reference: &Path, tok_check: Option<&Path>) -> f64 {
    let checker = script("check_transformers.py");
    let mut args = vec![
        os(&checker),
        dir.as_os_str(),
        reference.as_os_str(),
        os("--rtol"),
        os("1e-5"),
    ];
    if let Some(t) = tok_check {
        args.push(os("--tokenizer-check"));
        args.push(t.as_os_str());
    }
    let report = run_py(py, &args);
    assert_eq!(report["failures"], serde_json::json!([]), "{report}");
    report["max_rel_diff"].as_f64().unwrap()
}

#[test]
fn transformers_loads_merged_exports_with_our_logits_and_tokenizer() {
    let Some(py) = python("transformers_loads_merged_exports_with_our_logits_and_tokenizer") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tok_check = dir.path().join("bytes.json");
    tokenizer_cases(&Tokenizer::bytes(), &tok_check);
    for tie in [false, true] {
        let (trainer, ckpt) = trained(dir.path(), tie);
        let cfg = trainer.model.config.clone();
        let merged = trainer.merged_weights().unwrap();
        let ids = random_ids(258, 7);
        let ours = forward(&cfg, &merged, &ids);
        // The trainer's own forward (adapters unmerged) agrees with the merged model too.
        let live = trainer.model.forward(&ids, None).unwrap();
        let d = (&live - &ours).unwrap().abs().unwrap().max_all().unwrap();
        let scale = ours.abs().unwrap().max_all().unwrap();
        let rel = d.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
        println!("tie={tie}: adapter forward vs merged forward, max relative difference {rel:.2e}");
        assert!(rel < 1e-5);
        let reference = dir.path().join(format!("ref-{tie}.safetensors"));
        write_reference(&reference, &ids, &ours);

        let out = dir.path().join(format!("hf-{tie}"));
        merge_checkpoint(&ckpt, &out, None, &HfExportOptions::default()).unwrap();
        let rel = check_model(&py, &out, &reference, Some(&tok_check));
        println!("tie={tie}: f32 export, transformers vs relora logits: max relative difference {rel:.2e}");

        // Shards load as well.
        let sharded = dir.path().join(format!("hf-sharded-{tie}"));
        let opts = HfExportOptions {
            max_shard_bytes: Some(100_000),
            ..HfExportOptions::default()
        };
        merge_checkpoint(&ckpt, &sharded, None, &opts).unwrap();
        assert!(sharded.join("model.safetensors.index.json").exists());
        check_model(&py, &sharded, &reference, None);

        // bf16: the stored values are ours rounded to bf16 (transformers upcasts them to f32 here).
        let bf = dir.path().join(format!("hf-bf16-{tie}"));
        let opts = HfExportOptions {
            dtype: ExportDType::BF16,
            ..HfExportOptions::default()
        };
        merge_checkpoint(&ckpt, &bf, None, &opts).unwrap();
        let rounded: HashMap<String, Tensor> = merged
            .iter()
            .map(|(k, v)| {
                let r = v
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                (k.clone(), r)
            })
            .collect();
        let reference16 = dir.path().join(format!("ref16-{tie}.safetensors"));
        write_reference(&reference16, &ids, &forward(&cfg, &rounded, &ids));
        let rel = check_model(&py, &bf, &reference16, None);
        println!("tie={tie}: bf16 export: max relative difference {rel:.2e}");
    }
}

#[test]
fn llama_cpp_converts_and_runs_the_export_with_our_logits_and_tokenizer() {
    let test = "llama_cpp_converts_and_runs_the_export_with_our_logits_and_tokenizer";
    let Some(py) = python(test) else {
        return;
    };
    let Some(convert) = std::env::var_os("RELORA_LLAMA_CONVERT").filter(|c| !c.is_empty()) else {
        println!(
            "SKIP {test}: set RELORA_LLAMA_CONVERT to llama.cpp's convert_hf_to_gguf.py (with gguf \
             and llama-cpp-python installed in RELORA_PYTHON) to run the llama.cpp check"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tok_check = dir.path().join("bytes.json");
    tokenizer_cases(&Tokenizer::bytes(), &tok_check);
    for tie in [false, true] {
        let (trainer, ckpt) = trained(dir.path(), tie);
        let merged = trainer.merged_weights().unwrap();
        let ids = random_ids(258, 11);
        let reference = dir.path().join(format!("ref-llama-{tie}.safetensors"));
        write_reference(
            &reference,
            &ids,
            &forward(&trainer.model.config, &merged, &ids),
        );
        let out = dir.path().join(format!("hf-llama-{tie}"));
        merge_checkpoint(&ckpt, &out, None, &HfExportOptions::default()).unwrap();
        let checker = script("check_llama_cpp.py");
        let report = run_py(
            &py,
            &[
                os(&checker),
                out.as_os_str(),
                reference.as_os_str(),
                os("--convert"),
                convert.as_os_str(),
                os("--rtol"),
                os("1e-5"),
                os("--tokenizer-check"),
                tok_check.as_os_str(),
            ],
        );
        assert_eq!(report["failures"], serde_json::json!([]), "{report}");
        println!(
            "tie={tie}: llama.cpp vs relora logits: max relative difference {:.2e}",
            report["max_rel_diff"].as_f64().unwrap()
        );
    }
}

#[test]
fn auto_tokenizer_reads_the_gpt2_export_like_tiktoken() {
    let Some(py) = python("auto_tokenizer_reads_the_gpt2_export_like_tiktoken") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::gpt2().unwrap();
    let mut cfg = train_cfg(Mode::Full, "f32");
    cfg.steps = 4;
    let t = Trainer::new(&tiny(50257), &cfg, &Device::Cpu).unwrap();
    let weights = t.merged_weights().unwrap();
    let out = dir.path().join("gpt2");
    write_model_dir(
        &weights,
        &t.model.config,
        Some("gpt2"),
        &out,
        &HfExportOptions::default(),
    )
    .unwrap();
    let ids = random_ids(50257, 3);
    let reference = dir.path().join("ref.safetensors");
    write_reference(&reference, &ids, &forward(&t.model.config, &weights, &ids));
    let cases = dir.path().join("gpt2.json");
    tokenizer_cases(&tok, &cases);
    check_model(&py, &out, &reference, Some(&cases));
}

#[test]
fn peft_merge_and_unload_equals_our_merge() {
    let Some(py) = python("peft_merge_and_unload_equals_our_merge") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_, ckpt) = trained(dir.path(), false);
    let adapter = dir.path().join("adapter");
    write_peft(&ckpt, &adapter, &HfExportOptions::default()).unwrap();
    let merged = dir.path().join("merged.safetensors");
    merge_checkpoint(&ckpt, &merged, None, &HfExportOptions::default()).unwrap();
    let report = run_py(
        &py,
        &[
            os(&script("check_peft.py")),
            adapter.as_os_str(),
            merged.as_os_str(),
            os("--rtol"),
            os("1e-6"),
        ],
    );
    assert_eq!(report["failures"], serde_json::json!([]), "{report}");
    assert_eq!(report["adapter_tensors"], 28);
}

#[test]
fn transformers_saved_llamas_import_exactly_and_run_with_their_logits() {
    let Some(py) = python("transformers_saved_llamas_import_exactly_and_run_with_their_logits")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let variants: [(&str, &[&str], ExportDType); 3] = [
        ("f32", &["--dtype", "float32"], ExportDType::F32),
        (
            "bf16-sharded",
            &["--dtype", "bfloat16", "--max-shard-size", "60KB"],
            ExportDType::BF16,
        ),
        (
            "f16-tied",
            &["--dtype", "float16", "--tie"],
            ExportDType::F16,
        ),
    ];
    for (name, extra, dtype) in variants {
        let hf = dir.path().join(name);
        let maker = script("make_tiny_llama.py");
        let mut args = vec![os(&maker), hf.as_os_str()];
        args.extend(extra.iter().map(os));
        let out = Command::new(&py).args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if name.contains("sharded") {
            assert!(
                hf.join("model.safetensors.index.json").exists(),
                "not sharded"
            );
        }
        let ckpt = dir.path().join(format!("ckpt-{name}"));
        let mut opts = ImportOptions::default();
        opts.train.seq_len = 64;
        let report = import_hf(&hf, &ckpt, &opts).unwrap();
        println!("{name}: {}", serde_json::to_string(&report).unwrap());

        // merge with no training gives back the original tensors, bit for bit.
        let back = dir.path().join(format!("back-{name}.safetensors"));
        let o = HfExportOptions {
            dtype,
            ..HfExportOptions::default()
        };
        merge_checkpoint(&ckpt, &back, None, &o).unwrap();
        let orig = HfWeights::open(&hf).unwrap();
        let back = relora::tensor_file::safetensors::SafetensorsFile::open(&back).unwrap();
        let mut compared = 0;
        for t in back.tensors() {
            let src = orig.file_of(&t.name).unwrap();
            assert_eq!(src.info(&t.name).unwrap().dtype, t.dtype, "{}", t.name);
            assert!(
                *src.map(&t.name).unwrap() == *back.map(&t.name).unwrap(),
                "{name}: {} differs after import + merge",
                t.name
            );
            compared += 1;
        }
        assert_eq!(compared, report.tensors);

        // Our model computes transformers' logits from the imported weights.
        let (trainer, _) = checkpoint::load(&ckpt, &Device::Cpu).unwrap();
        let reference = relora::tensor_file::safetensors::SafetensorsFile::open(
            &hf.join("reference.safetensors"),
        )
        .unwrap();
        let ids = reference
            .tensor("input_ids")
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        let theirs = reference.tensor("logits").unwrap();
        let ours = trainer.model.forward(&ids, None).unwrap();
        let d = (&ours - &theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let s = theirs
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!("{name}: relora vs transformers logits on the imported model: max relative difference {:.2e}", d / s);
        assert!(d / s < 1e-5, "{name}: {}", d / s);
    }
}
