//! The other formats of `relora-convert`, checked without Python: tokenizer files (the byte and
//! GPT-2 tokenizers rebuilt as `tokenizer.json` encode exactly like ours), PEFT adapters (base +
//! adapter merges to the full export, bit for bit), Hugging Face import (round trips exactly and
//! resumes as ReLoRA), and update spectra (ReLoRA's update has rank above r, LoRA's does not).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{random_batch, tiny, train_cfg};
use relora::analysis::spectrum::{histogram_png, spectrum, table};
use relora::checkpoint::{self, SaveExtra};
use relora::config::{Mode, ModelConfig};
use relora::data::corpus::builtin_train_text;
use relora::data::tokenizer::{Tokenizer, TokenizerKind};
use relora::export::peft::{peft_name, write_peft, ADAPTER_CONFIG, ADAPTER_FILE, BASE_DIR};
use relora::export::tokenizer::{recognise, tokenizer_files};
use relora::export::{merge_checkpoint, write_model_dir, ExportDType, HfExportOptions};
use relora::import::{import_hf, ImportOptions};
use relora::relora::merge_delta;
use relora::run::{RunOptions, TrainRun};
use relora::tensor_file::safetensors::SafetensorsFile;
use relora::Trainer;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn run(dir: &Path, mode: Mode, steps: u64) -> (Trainer, PathBuf) {
    let cfg = train_cfg(mode, "f32");
    let mut t = Trainer::new(&tiny(258), &cfg, &Device::Cpu).unwrap();
    for s in 0..steps {
        t.step(&[random_batch(2, 8, 258, s)]).unwrap();
    }
    let ckpt = dir.join(format!("{mode}-{steps}"));
    let extra = SaveExtra {
        data: None,
        tokenizer: Some("bytes".into()),
        host_state: None,
    };
    checkpoint::save(&t, &ckpt, &extra).unwrap();
    (t, ckpt)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn write_files(dir: &Path, spec: &str, cfg: &ModelConfig) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in tokenizer_files(spec, cfg).unwrap().files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    dir.join("tokenizer.json")
}

fn sample_texts() -> Vec<String> {
    let mut v: Vec<String> = [
        "Hello world",
        "The quick brown fox, 42 times!\n\nNew paragraph.",
        "Grüße, naïve café ✓ — 東京 🚀",
        "  leading spaces\tand\ttabs\r\n  ",
        "it's they're we've I'm you'll he'd 1234567 3.14159",
        "<|endoftext|> and <s> as plain text",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(builtin_train_text().chars().take(3000).collect());
    v
}

#[test]
fn byte_tokenizer_json_encodes_and_decodes_like_the_byte_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_files(dir.path(), "bytes", &tiny(258));
    let ours = Tokenizer::bytes();
    let hf = Tokenizer::from_hf_file(&path).unwrap();
    assert_eq!(hf.vocab_size(), 258);
    assert_eq!((hf.bos_id(), hf.eos_id()), (Some(256), Some(257)));
    let raw = tokenizers::Tokenizer::from_file(&path).unwrap();
    for text in sample_texts() {
        let want = ours.encode(&text).unwrap();
        // Special spellings in text are split by HF (as in Llama's tokenizers), so compare the
        // texts without them here; the Python check uses split_special_tokens.
        if !text.contains("<s>") {
            assert_eq!(hf.encode(&text).unwrap(), want, "{text:?}");
        }
        let mut with_specials = vec![256];
        with_specials.extend(&want);
        with_specials.push(257);
        assert_eq!(raw.decode(&with_specials, true).unwrap(), text);
    }
    assert_eq!(recognise(&path).as_deref(), Some("bytes"));

    // A padded vocabulary gets extra special tokens so the sizes match exactly.
    let p = write_files(&dir.path().join("padded"), "bytes", &tiny(300));
    let t = tokenizers::Tokenizer::from_file(&p).unwrap();
    assert_eq!(t.get_vocab_size(true), 300);
    assert_eq!(t.token_to_id("<extra_41>"), Some(299));
    let err = tokenizer_files("bytes", &tiny(200))
        .unwrap_err()
        .to_string();
    assert!(err.contains("258") && err.contains("200"), "{err}");
}

#[test]
fn gpt2_tokenizer_json_rebuilt_from_ranks_matches_tiktoken() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_files(dir.path(), "gpt2", &tiny(50257));
    let ours = Tokenizer::gpt2().unwrap();
    let hf = Tokenizer::from_hf_file(&path).unwrap();
    assert_eq!(hf.vocab_size(), 50257);
    assert_eq!(hf.eos_id(), Some(50256));
    let raw = tokenizers::Tokenizer::from_file(&path).unwrap();
    for text in sample_texts() {
        let want = ours.encode(&text).unwrap();
        if !text.contains("<|endoftext|>") {
            assert_eq!(hf.encode(&text).unwrap(), want, "{text:?}");
        }
        assert_eq!(raw.decode(&want, false).unwrap(), text);
    }
    assert_eq!(recognise(&path).as_deref(), Some("gpt2"));
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["eos_token"], "<|endoftext|>");
}

#[test]
fn peft_base_plus_adapter_is_the_full_merge() {
    let dir = tempfile::tempdir().unwrap();
    let (trainer, ckpt) = run(dir.path(), Mode::Relora, 17);
    assert_eq!(trainer.phases().len(), 2);
    let out = dir.path().join("peft");
    write_peft(&ckpt, &out, &HfExportOptions::default()).unwrap();
    let full = dir.path().join("full.safetensors");
    merge_checkpoint(&ckpt, &full, None, &HfExportOptions::default()).unwrap();
    let full = SafetensorsFile::open(&full).unwrap();
    let base = SafetensorsFile::open(&out.join(BASE_DIR).join("model.safetensors")).unwrap();
    let adapter = SafetensorsFile::open(&out.join(ADAPTER_FILE)).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    assert!(cfg["base_model_name_or_path"]
        .as_str()
        .unwrap()
        .ends_with("peft/base"));
    assert_eq!(adapter.tensors().len(), 2 * 7 * 2);
    let scale = 8.0 / 4.0;
    for p in trainer.model.projections() {
        let a = adapter.tensor(&peft_name(&p.name, "lora_A")).unwrap();
        let b = adapter.tensor(&peft_name(&p.name, "lora_B")).unwrap();
        assert_eq!(a.dims(), &[4, p.in_dim()]);
        assert_eq!(b.dims(), &[p.out_dim(), 4]);
        let name = format!("{}.weight", p.name);
        let w = base.tensor(&name).unwrap();
        // The base holds the weights the adapter was trained against.
        assert!(bits(&w) == bits(p.weight.as_tensor()), "{name}");
        let merged = merge_delta(&p.name, &w, &a, &b, scale).unwrap();
        assert!(
            bits(&merged) == bits(&full.tensor(&name).unwrap()),
            "{name}"
        );
    }
    for name in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        assert!(bits(&base.tensor(name).unwrap()) == bits(&full.tensor(name).unwrap()));
    }
    // A full-rank checkpoint has no adapter to export.
    let (_, full_ckpt) = run(dir.path(), Mode::Full, 3);
    let err = write_peft(
        &full_ckpt,
        &dir.path().join("p2"),
        &HfExportOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no adapters"), "{err}");
    assert!(!dir.path().join("p2").exists());
}

#[test]
fn import_round_trips_exactly_and_resumes_as_relora() {
    let dir = tempfile::tempdir().unwrap();
    let (trainer, _) = run(dir.path(), Mode::Relora, 12);
    let weights = trainer.merged_weights().unwrap();
    let cfg = trainer.model.config.clone();
    let hf = dir.path().join("hf");
    write_model_dir(
        &weights,
        &cfg,
        Some("bytes"),
        &hf,
        &HfExportOptions::default(),
    )
    .unwrap();

    let ckpt = dir.path().join("imported");
    let mut opts = ImportOptions::default();
    opts.train.steps = 30;
    opts.train.batch_size = 2;
    opts.train.seq_len = 8;
    opts.train.warmup_steps = 2;
    opts.train.reset_every = 5;
    opts.train.restart_warmup_steps = 2;
    opts.train.lora_rank = 4;
    let report = import_hf(&hf, &ckpt, &opts).unwrap();
    assert_eq!(report.tensors, weights.len());
    assert_eq!(report.tokenizer.as_deref(), Some("bytes"));
    assert_eq!(report.source_dtypes, vec!["F32"]);

    // Merge with no training reproduces the export byte for byte.
    let again = dir.path().join("again");
    merge_checkpoint(&ckpt, &again, None, &HfExportOptions::default()).unwrap();
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert_eq!(
            std::fs::read(hf.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f}"
        );
    }
    // The checkpoint loads and continues with ReLoRA: adapters at step 0, a merge at step 5.
    let (loaded, manifest) = checkpoint::load(&ckpt, &Device::Cpu).unwrap();
    assert_eq!(manifest.counters.step, 0);
    for (name, t) in loaded.model.weights() {
        assert!(bits(&t) == bits(&weights[&name]), "{name}");
    }
    drop(loaded);
    let tokens: Vec<u32> = builtin_train_text()
        .bytes()
        .take(5000)
        .map(u32::from)
        .collect();
    let run_opts = RunOptions {
        out_dir: dir.path().join("cont"),
        save_every: 0,
        keep_last: 0,
        eval_every: 0,
        eval_batches: 1,
        writer: true,
    };
    let mut cont = TrainRun::resume(&ckpt, &Device::Cpu, tokens, None, run_opts).unwrap();
    let mut events = Vec::new();
    cont.train_until(7, |r| {
        events.push((r.stats.switched, r.stats.reset.map(|x| x.phase)));
        true
    })
    .unwrap();
    assert_eq!(events[0], (true, None), "adapters attach at the first step");
    assert!(events.contains(&(false, Some(1))), "{events:?}");

    // bf16 shards import too, and export back to the same bf16 values.
    let hf16 = dir.path().join("hf16");
    let sharded = HfExportOptions {
        dtype: ExportDType::BF16,
        max_shard_bytes: Some(40_000),
        force: false,
    };
    write_model_dir(&weights, &cfg, Some("bytes"), &hf16, &sharded).unwrap();
    assert!(hf16.join("model.safetensors.index.json").exists());
    let ck16 = dir.path().join("ck16");
    let r = import_hf(&hf16, &ck16, &opts).unwrap();
    assert_eq!(r.source_dtypes, vec!["BF16"]);
    let back = dir.path().join("back16");
    merge_checkpoint(&ck16, &back, None, &sharded).unwrap();
    let index = std::fs::read(hf16.join("model.safetensors.index.json")).unwrap();
    assert_eq!(
        index,
        std::fs::read(back.join("model.safetensors.index.json")).unwrap()
    );
    let v: serde_json::Value = serde_json::from_slice(&index).unwrap();
    let shards: std::collections::BTreeSet<&str> = v["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|s| s.as_str().unwrap())
        .collect();
    for s in shards {
        assert_eq!(
            std::fs::read(hf16.join(s)).unwrap(),
            std::fs::read(back.join(s)).unwrap(),
            "{s}"
        );
    }
}

#[test]
fn import_rejects_what_the_model_cannot_represent() {
    let dir = tempfile::tempdir().unwrap();
    let (trainer, _) = run(dir.path(), Mode::Full, 2);
    let weights = trainer.merged_weights().unwrap();
    let cfg = trainer.model.config.clone();
    let hf = dir.path().join("hf");
    write_model_dir(&weights, &cfg, None, &hf, &HfExportOptions::default()).unwrap();
    let opts = ImportOptions {
        train: {
            let mut t = train_cfg(Mode::Relora, "f32");
            t.warmup_full_steps = 0;
            t
        },
        ..ImportOptions::default()
    };
    let edit_config = |key: &str, value: serde_json::Value| -> PathBuf {
        let d = dir.path().join(format!("bad-{key}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(hf.join("model.safetensors"), d.join("model.safetensors")).unwrap();
        let mut c: serde_json::Value =
            serde_json::from_slice(&std::fs::read(hf.join("config.json")).unwrap()).unwrap();
        c[key] = value;
        std::fs::write(d.join("config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
        d
    };
    for (key, value, needle) in [
        ("attention_bias", serde_json::json!(true), "attention_bias"),
        ("hidden_act", serde_json::json!("gelu"), "hidden_act"),
        ("model_type", serde_json::json!("mistral"), "model_type"),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
            "llama3",
        ),
        ("head_dim", serde_json::json!(32), "head_dim"),
        (
            "intermediate_size",
            serde_json::json!(100),
            "gate_proj.weight",
        ),
    ] {
        let d = edit_config(key, value);
        let out = dir.path().join(format!("ck-{key}"));
        let err = import_hf(&d, &out, &opts).unwrap_err().to_string();
        assert!(err.contains(needle), "{key}: {err}");
        assert!(!out.exists());
    }
    // Rotary tables and a tied head are skipped; anything else unknown is refused.
    let d = dir.path().join("extra");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(hf.join("config.json"), d.join("config.json")).unwrap();
    let mut w: HashMap<String, Tensor> = weights.clone();
    w.insert(
        "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&w, d.join("model.safetensors")).unwrap();
    let r = import_hf(&d, &dir.path().join("ok"), &opts).unwrap();
    assert_eq!(r.skipped.len(), 1, "{:?}", r.skipped);
    w.insert(
        "model.layers.0.self_attn.q_proj.bias".into(),
        Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&w, d.join("model.safetensors")).unwrap();
    let err = import_hf(&d, &dir.path().join("no"), &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("q_proj.bias"), "{err}");
    w.remove("model.layers.0.self_attn.q_proj.bias");
    w.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&w, d.join("model.safetensors")).unwrap();
    let err = import_hf(&d, &dir.path().join("no"), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("missing"),
        "{err}"
    );
    assert!(!dir.path().join("no").exists());
    // An unknown tokenizer.json is copied into the checkpoint and recorded by path.
    let tok_dir = dir.path().join("tok");
    write_files(&tok_dir, "bytes", &tiny(258));
    let mut j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tok_dir.join("tokenizer.json")).unwrap()).unwrap();
    j["model"]["vocab"]["<0x41>"] = serde_json::json!(66);
    j["model"]["vocab"]["<0x42>"] = serde_json::json!(65);
    std::fs::write(hf.join("tokenizer.json"), serde_json::to_vec(&j).unwrap()).unwrap();
    let ck = dir.path().join("custom-tok");
    let r = import_hf(&hf, &ck, &opts).unwrap();
    let spec = r.tokenizer.unwrap();
    assert!(spec.ends_with("custom-tok/tokenizer.json"), "{spec}");
    let t = Tokenizer::from_spec(&spec).unwrap();
    assert!(matches!(t.kind(), TokenizerKind::HuggingFace(_)));
    assert_eq!(t.encode("AB").unwrap(), vec![66, 65]);
}

#[test]
fn relora_updates_exceed_the_adapter_rank_and_lora_updates_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let (relora_t, relora_ck) = run(dir.path(), Mode::Relora, 22);
    let (_, lora_ck) = run(dir.path(), Mode::Lora, 22);
    assert_eq!(relora_t.phases().len(), 3);
    let s = spectrum(&relora_ck, None).unwrap();
    let l = spectrum(&lora_ck, None).unwrap();
    assert_eq!(s.modules.len(), 14);
    let max_rank = s.modules.iter().map(|m| m.rank).max().unwrap();
    assert!(max_rank > 4 && max_rank <= 16, "ReLoRA rank {max_rank}");
    assert!(l.modules.iter().all(|m| m.rank <= 4), "LoRA exceeds r");
    // The singular values account for the whole update.
    let m = &s.modules[0];
    let merged = relora_t.merged_weights().unwrap();
    let base = SafetensorsFile::open(&relora_ck.join("base.safetensors")).unwrap();
    let name = format!("{}.weight", m.module);
    let d = (merged[&name].to_dtype(DType::F64).unwrap()
        - base.tensor(&name).unwrap().to_dtype(DType::F64).unwrap())
    .unwrap();
    let fro = d
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    assert!(
        (fro - m.frobenius).abs() <= 1e-9 * fro,
        "{fro} vs {}",
        m.frobenius
    );

    let text = table(&[s.clone(), l.clone()]);
    assert!(
        text.contains("layers.1.mlp.down_proj") && text.contains("run B"),
        "{text}"
    );
    let png = dir.path().join("spectrum.png");
    histogram_png(&[s.clone(), l.clone()], &png, 30, false).unwrap();
    histogram_png(&[s, l], &png, 30, true).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");

    // A full-rank run has no base; another checkpoint serves as the reference.
    let (_, early) = run(dir.path(), Mode::Full, 2);
    let (_, late) = run(dir.path(), Mode::Full, 6);
    let err = spectrum(&late, None).unwrap_err().to_string();
    assert!(err.contains("--from"), "{err}");
    let f = spectrum(&late, Some(&early)).unwrap();
    assert_eq!(f.modules.len(), 14);
    assert!(f.modules.iter().any(|m| m.rank > 4));
}
