//! `merge`: the exported weights equal the trainer's bit for bit (at the end and after each
//! phase), dtype conversion and sharding are faithful, the export's exact layout (golden), and
//! every kind of bad input is a clear error that writes nothing.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{random_batch, tiny, train_cfg};
use relora::checkpoint::{self, Manifest, SaveExtra};
use relora::config::Mode;
use relora::export::recognise::export_metadata;
use relora::export::{merge_checkpoint, write_model_dir, ExportDType, HfExportOptions};
use relora::tensor_file::dtype::StDType;
use relora::tensor_file::safetensors::{
    pt_metadata, PlannedTensor, SafetensorsFile, SafetensorsWriter,
};
use relora::{Error, Trainer};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A tiny ReLoRA run with three merges and a trained current adapter, saved; returns the
/// trainer, the checkpoint and the projection weights right after each merge.
fn trained(dir: &Path, mode: Mode, tie: bool) -> (Trainer, PathBuf, Vec<HashMap<String, Tensor>>) {
    let mut cfg = train_cfg(mode, "f32");
    cfg.steps = 22;
    let mut model = tiny(258);
    model.tie_word_embeddings = tie;
    let mut t = Trainer::new(&model, &cfg, &Device::Cpu).unwrap();
    let mut after_phase = Vec::new();
    for step in 0..22u64 {
        let stats = t.step(&[random_batch(2, 8, 258, step)]).unwrap();
        if stats.reset.is_some() {
            let w: HashMap<String, Tensor> = t
                .model
                .projections()
                .iter()
                .map(|p| {
                    (
                        format!("{}.weight", p.name),
                        p.weight.as_tensor().copy().unwrap(),
                    )
                })
                .collect();
            after_phase.push(w);
        }
    }
    let ckpt = dir.join("ckpt");
    let extra = SaveExtra {
        data: None,
        tokenizer: Some("bytes".into()),
        host_state: None,
    };
    checkpoint::save(&t, &ckpt, &extra).unwrap();
    (t, ckpt, after_phase)
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

fn load_all(path: &Path) -> HashMap<String, Tensor> {
    let f = SafetensorsFile::open(path).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let t = f.tensor(&n).unwrap();
            (n, t)
        })
        .collect()
}

#[test]
fn merge_reproduces_the_trainer_bit_for_bit_at_the_end_and_after_each_phase() {
    let dir = tempfile::tempdir().unwrap();
    let (trainer, ckpt, after_phase) = trained(dir.path(), Mode::Relora, false);
    assert_eq!(
        trainer.phases().len(),
        3,
        "the run should have merged three times"
    );
    assert_eq!(after_phase.len(), 3);
    let live = trainer.merged_weights().unwrap();

    let out = dir.path().join("all.safetensors");
    merge_checkpoint(&ckpt, &out, None, &HfExportOptions::default()).unwrap();
    let merged = load_all(&out);
    assert_eq!(merged.len(), live.len());
    for (name, t) in &live {
        assert!(
            bits(&merged[name]) == bits(t),
            "{name} differs from the trainer's weights"
        );
    }
    // The current adapter really contributes: the export differs from phase 3's projections.
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert!(bits(&merged[q]) != bits(&after_phase[2][q]));

    for (k, snapshot) in after_phase.iter().enumerate() {
        let out = dir.path().join(format!("phase{}.safetensors", k + 1));
        merge_checkpoint(&ckpt, &out, Some(k + 1), &HfExportOptions::default()).unwrap();
        let m = load_all(&out);
        for (name, t) in snapshot {
            assert!(bits(&m[name]) == bits(t), "phase {}: {name} differs", k + 1);
        }
        // Dense tensors are the current ones.
        let e = "model.embed_tokens.weight";
        assert!(bits(&m[e]) == bits(&live[e]));
    }
    let base = dir.path().join("phase0.safetensors");
    merge_checkpoint(&ckpt, &base, Some(0), &HfExportOptions::default()).unwrap();
    let b = load_all(&base);
    let stored = load_all(&ckpt.join("base.safetensors"));
    for (name, t) in &stored {
        assert!(bits(&b[name]) == bits(t), "phase 0: {name} is not the base");
    }
    let err = merge_checkpoint(
        &ckpt,
        &dir.path().join("x.safetensors"),
        Some(4),
        &HfExportOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("phase 4") && err.contains("3 completed phases"),
        "{err}"
    );
}

#[test]
fn in_memory_export_and_streamed_merge_write_identical_files() {
    let dir = tempfile::tempdir().unwrap();
    let (trainer, ckpt, _) = trained(dir.path(), Mode::Relora, false);
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let cfg = trainer.model.config.clone();
    write_model_dir(
        &trainer.merged_weights().unwrap(),
        &cfg,
        Some("bytes"),
        &a,
        &HfExportOptions::default(),
    )
    .unwrap();
    merge_checkpoint(&ckpt, &b, None, &HfExportOptions::default()).unwrap();
    for f in [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
}

#[test]
fn half_precision_exports_round_like_candle_and_shards_cover_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (trainer, ckpt, _) = trained(dir.path(), Mode::Relora, false);
    let live = trainer.merged_weights().unwrap();
    for (dtype, cd) in [
        (ExportDType::BF16, DType::BF16),
        (ExportDType::F16, DType::F16),
    ] {
        let out = dir.path().join(format!("{dtype}"));
        let opts = HfExportOptions {
            dtype,
            max_shard_bytes: Some(60_000),
            force: false,
        };
        merge_checkpoint(&ckpt, &out, None, &opts).unwrap();
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let map = index["weight_map"].as_object().unwrap();
        assert_eq!(map.len(), live.len());
        let mut total = 0u64;
        let mut seen = 0;
        let shards: std::collections::BTreeSet<&str> =
            map.values().map(|v| v.as_str().unwrap()).collect();
        assert!(shards.len() > 2, "{shards:?}");
        for shard in &shards {
            let f = SafetensorsFile::open(&out.join(shard)).unwrap();
            assert!(
                f.len() <= 60_000 + 4096 || f.tensors().len() == 1,
                "{shard} too big"
            );
            assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
            for t in f.tensors() {
                assert_eq!(map[&t.name], *shard);
                assert_eq!(t.dtype, dtype.st());
                total += t.bytes();
                seen += 1;
                let want = live[&t.name].to_dtype(cd).unwrap();
                let got = f.tensor(&t.name).unwrap();
                assert!(
                    bits(&got) == bits(&want),
                    "{}: {dtype} rounding differs from candle",
                    t.name
                );
            }
        }
        assert_eq!(seen, live.len());
        assert_eq!(index["metadata"]["total_size"], total);
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["torch_dtype"], dtype.torch_name());
        assert_eq!(cfg["dtype"], dtype.torch_name());
    }
}

/// The exact layout of a tiny export: file names, tensor names, shapes, dtypes and config keys.
#[test]
fn golden_layout_of_a_tiny_export() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ckpt, _) = trained(dir.path(), Mode::Relora, true);
    let out = dir.path().join("hf");
    let opts = HfExportOptions {
        dtype: ExportDType::BF16,
        ..HfExportOptions::default()
    };
    merge_checkpoint(&ckpt, &out, None, &opts).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "relora-export.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let f = SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    let got: Vec<String> = f
        .tensors()
        .iter()
        .map(|t| format!("{} {} {:?}", t.name, t.dtype, t.shape))
        .collect();
    let mut want = vec!["model.embed_tokens.weight BF16 [258, 64]".to_string()];
    for i in 0..2 {
        for (n, s) in [
            ("input_layernorm", "[64]"),
            ("mlp.down_proj", "[64, 172]"),
            ("mlp.gate_proj", "[172, 64]"),
            ("mlp.up_proj", "[172, 64]"),
            ("post_attention_layernorm", "[64]"),
            ("self_attn.k_proj", "[32, 64]"),
            ("self_attn.o_proj", "[64, 64]"),
            ("self_attn.q_proj", "[64, 64]"),
            ("self_attn.v_proj", "[32, 64]"),
        ] {
            want.push(format!("model.layers.{i}.{n}.weight BF16 {s}"));
        }
    }
    want.push("model.norm.weight BF16 [64]".to_string());
    want.sort();
    assert_eq!(
        got, want,
        "tied embeddings: no lm_head; no lora_* or inv_freq"
    );
    assert_eq!(f.metadata(), &export_metadata());

    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let mut keys: Vec<&str> = cfg
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "architectures",
            "attention_bias",
            "attention_dropout",
            "bos_token_id",
            "dtype",
            "eos_token_id",
            "head_dim",
            "hidden_act",
            "hidden_size",
            "initializer_range",
            "intermediate_size",
            "max_position_embeddings",
            "mlp_bias",
            "model_type",
            "num_attention_heads",
            "num_hidden_layers",
            "num_key_value_heads",
            "pretraining_tp",
            "rms_norm_eps",
            "rope_parameters",
            "rope_theta",
            "tie_word_embeddings",
            "torch_dtype",
            "use_cache",
            "vocab_size"
        ]
    );
    let expect = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 258,
        "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": true, "attention_bias": false, "attention_dropout": 0.0,
        "mlp_bias": false, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": true,
        "bos_token_id": 256, "eos_token_id": 257, "torch_dtype": "bfloat16", "dtype": "bfloat16"
    });
    assert_eq!(cfg, expect);
    let gen: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        gen,
        serde_json::json!({"_from_model_config": true, "bos_token_id": 256, "eos_token_id": 257})
    );
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["bos_token"], "<s>");
    assert_eq!(tc["eos_token"], "</s>");
    assert_eq!(tc["add_bos_token"], false);
    assert_eq!(tc["model_max_length"], 256);
}

// ---------------------------------------------------------------------------------------------
// Bad input: a clear error naming the file or tensor, and nothing written.

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("phases")).unwrap();
    for e in std::fs::read_dir(from)
        .unwrap()
        .chain(std::fs::read_dir(from.join("phases")).unwrap())
    {
        let p = e.unwrap().path();
        if p.is_file() {
            let rel = p.strip_prefix(from).unwrap();
            std::fs::copy(&p, to.join(rel)).unwrap();
        }
    }
}

/// Rewrites one safetensors file of a checkpoint through `edit` and fixes the manifest's size
/// and checksum, so only the content is wrong.
fn rewrite(
    ckpt: &Path,
    rel: &str,
    edit: impl FnOnce(&mut Vec<(String, StDType, Vec<usize>, Vec<u8>)>),
) {
    let path = ckpt.join(rel);
    let f = SafetensorsFile::open(&path).unwrap();
    let mut tensors: Vec<(String, StDType, Vec<usize>, Vec<u8>)> = f
        .tensors()
        .into_iter()
        .map(|t| {
            (
                t.name.clone(),
                t.dtype,
                t.shape.clone(),
                f.map(&t.name).unwrap().to_vec(),
            )
        })
        .collect();
    drop(f);
    edit(&mut tensors);
    let plan = tensors
        .iter()
        .map(|(n, d, s, _)| PlannedTensor {
            name: n.clone(),
            dtype: *d,
            shape: s.clone(),
        })
        .collect();
    let mut w = SafetensorsWriter::create(&path, plan, &pt_metadata()).unwrap();
    for (_, _, _, b) in &tensors {
        w.write(b).unwrap();
    }
    w.finish().unwrap();
    fix_manifest(ckpt, |m| {
        let bytes = std::fs::read(&path).unwrap();
        let info = m.files.get_mut(rel).unwrap();
        info.bytes = bytes.len() as u64;
        info.crc32 = crc32fast::hash(&bytes);
    });
}

fn fix_manifest(ckpt: &Path, edit: impl FnOnce(&mut Manifest)) {
    let p = ckpt.join("manifest.json");
    let mut m: Manifest = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    edit(&mut m);
    m.write(ckpt).unwrap();
}

fn expect_failure(ckpt: &Path, out_parent: &Path, needles: &[&str]) {
    let listing = || {
        let mut v: Vec<_> = std::fs::read_dir(out_parent)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    let before = listing();
    for out in [
        out_parent.join("model"),
        out_parent.join("model.safetensors"),
    ] {
        let err = merge_checkpoint(ckpt, &out, None, &HfExportOptions::default()).unwrap_err();
        let msg = err.to_string();
        for n in needles {
            assert!(msg.contains(n), "expected '{n}' in: {msg}");
        }
        assert!(
            matches!(err, Error::Checkpoint { .. } | Error::Io { .. }),
            "{err:?}"
        );
        assert!(!out.exists(), "{} was written", out.display());
    }
    assert_eq!(before, listing(), "temporary files left behind");
}

#[test]
fn bad_checkpoints_are_clear_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_, good, _) = trained(dir.path(), Mode::Relora, false);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let case = |name: &str| {
        let d = dir.path().join(name);
        copy_dir(&good, &d);
        d
    };

    let d = case("truncated");
    let p = d.join("phases/phase-0002.safetensors");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 10]).unwrap();
    expect_failure(&d, &out, &["phase-0002.safetensors", "truncated"]);

    let d = case("corrupt");
    let p = d.join("base.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n - 5] ^= 0x10;
    std::fs::write(&p, &b).unwrap();
    expect_failure(&d, &out, &["base.safetensors", "checksum"]);

    // Truncated, with the manifest "fixed" to match: the header check catches it.
    let d = case("truncated-consistent");
    let rel = "adapters.safetensors";
    let p = d.join(rel);
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 64]).unwrap();
    fix_manifest(&d, |m| {
        let b = std::fs::read(&p).unwrap();
        let i = m.files.get_mut(rel).unwrap();
        i.bytes = b.len() as u64;
        i.crc32 = crc32fast::hash(&b);
    });
    expect_failure(&d, &out, &["adapters.safetensors", "truncated"]);

    let d = case("missing");
    rewrite(&d, "params.safetensors", |t| {
        t.retain(|x| x.0 != "model.norm.weight")
    });
    expect_failure(&d, &out, &["model.norm.weight", "missing"]);

    let d = case("extra");
    rewrite(&d, "params.safetensors", |t| {
        t.push((
            "model.rotary_emb.inv_freq".into(),
            StDType::F32,
            vec![8],
            vec![0; 32],
        ))
    });
    expect_failure(&d, &out, &["model.rotary_emb.inv_freq", "unexpected"]);

    let d = case("shape");
    rewrite(&d, "phases/phase-0001.safetensors", |t| {
        for x in t.iter_mut() {
            if x.0 == "model.layers.1.mlp.up_proj.lora_A" {
                x.2 = vec![x.2[1], x.2[0]];
            }
        }
    });
    expect_failure(&d, &out, &["model.layers.1.mlp.up_proj.lora_A", "shape"]);

    let d = case("dtype");
    rewrite(&d, "base.safetensors", |t| {
        for x in t.iter_mut() {
            if x.0 == "model.layers.0.self_attn.v_proj.weight" {
                x.1 = StDType::F16;
                x.3.truncate(x.3.len() / 2);
            }
        }
    });
    expect_failure(&d, &out, &["model.layers.0.self_attn.v_proj.weight", "F16"]);

    let d = case("missing-adapter");
    rewrite(&d, "phases/phase-0003.safetensors", |t| {
        t.retain(|x| x.0 != "model.layers.0.mlp.gate_proj.lora_B")
    });
    expect_failure(
        &d,
        &out,
        &["model.layers.0.mlp.gate_proj.lora_B", "missing"],
    );

    let d = case("gap");
    fix_manifest(&d, |m| {
        m.phases.remove(1);
        m.phase_index = 2;
    });
    expect_failure(&d, &out, &["gap", "expected phase 2", "found phase 3"]);

    let d = case("version");
    fix_manifest(&d, |m| m.format_version = 99);
    expect_failure(&d, &out, &["format version 99"]);

    let d = case("gone");
    std::fs::remove_file(d.join("phases/phase-0001.safetensors")).unwrap();
    expect_failure(&d, &out, &["phase-0001.safetensors"]);

    // A directory relora did not write is refused, even with force, and left as it was.
    let force = HfExportOptions {
        force: true,
        ..HfExportOptions::default()
    };
    let target = out.join("exists");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"x").unwrap();
    for opts in [&HfExportOptions::default(), &force] {
        let err = merge_checkpoint(&good, &target, None, opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("keep") && err.contains("nothing was changed"),
            "{err}"
        );
        assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"x");
    }
    // relora's own export is refused without force, and replaced with it.
    std::fs::remove_file(target.join("keep")).unwrap();
    merge_checkpoint(&good, &target, None, &HfExportOptions::default()).unwrap();
    let err = merge_checkpoint(&good, &target, None, &HfExportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already holds") && err.contains("--force"),
        "{err}"
    );
    merge_checkpoint(&good, &target, None, &force).unwrap();
    assert!(target.join("model.safetensors").exists());
    let names: BTreeMap<String, ()> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| (e.unwrap().file_name().to_string_lossy().to_string(), ()))
        .collect();
    assert_eq!(names.keys().collect::<Vec<_>>(), vec!["exists"]);
}

#[test]
fn in_memory_weights_are_checked_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = train_cfg(Mode::Relora, "f32");
    cfg.steps = 8;
    let mut t = Trainer::new(&tiny(258), &cfg, &Device::Cpu).unwrap();
    for s in 0..6 {
        t.step(&[random_batch(2, 8, 258, s)]).unwrap();
    }
    let model_cfg = t.model.config.clone();
    let out = dir.path().join("m");
    let mut w = t.merged_weights().unwrap();
    w.insert(
        "model.layers.0.self_attn.q_proj.lora_A".into(),
        Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = write_model_dir(&w, &model_cfg, None, &out, &HfExportOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("lora_A") && err.to_string().contains("adapter"),
        "{err}"
    );
    let mut w = t.merged_weights().unwrap();
    w.insert(
        "model.norm.weight".into(),
        Tensor::zeros(65, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = write_model_dir(&w, &model_cfg, None, &out, &HfExportOptions::default()).unwrap_err();
    assert!(err.to_string().contains("model.norm.weight"), "{err}");
    let mut w = t.merged_weights().unwrap();
    w.remove("lm_head.weight");
    let err = write_model_dir(&w, &model_cfg, None, &out, &HfExportOptions::default()).unwrap_err();
    assert!(err.to_string().contains("lm_head.weight"), "{err}");
    let err = write_model_dir(
        &t.merged_weights().unwrap(),
        &model_cfg,
        Some("/no/such/tokenizer.json"),
        &out,
        &HfExportOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("/no/such/tokenizer.json"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "something was written"
    );
}
