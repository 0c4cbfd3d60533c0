//! `relora-convert synth`: a checkpoint of any preset with random weights, K completed phases and
//! a current adapter, written tensor by tensor (so a 1B model needs no more memory than a 16 MB
//! buffer). The optimizer file is left empty: `merge` never reads it. For benchmarks only.

use anyhow::{bail, Result};
use clap::Args;
use relora::checkpoint::files::FileInfo;
use relora::checkpoint::manifest::{Manifest, PhaseEntry, FORMAT, FORMAT_VERSION};
use relora::checkpoint::source::is_projection;
use relora::config::{Mode, ModelConfig, TrainConfig};
use relora::tensor_file::dtype::StDType;
use relora::tensor_file::safetensors::{
    header_bytes, pt_metadata, PlannedTensor, SafetensorsWriter,
};
use relora::trainer::{TrainerCounters, TrainerRngs};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Options of `relora-convert synth`.
#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Checkpoint directory to create.
    out: PathBuf,
    /// Model preset (tiny, small, 60m, 130m, 250m, 350m, 1b).
    #[arg(long, default_value = "1b")]
    preset: String,
    /// Vocabulary size.
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    /// Completed ReLoRA phases.
    #[arg(long, default_value_t = 3)]
    phases: usize,
    /// Adapter rank.
    #[arg(long, default_value_t = 128)]
    rank: usize,
    /// Seed of the random values.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// xorshift64* values uniform in [-amp, amp): fast enough to fill gigabytes.
struct Fill {
    state: u64,
}

impl Fill {
    fn next(&mut self, amp: f32) -> f32 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let r = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let u = (r >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * u - 1.0) * amp
    }
}

/// Writes one safetensors file of random f32 tensors (`(name, shape, amplitude)`); a shape of
/// `[1]` with amplitude < 0 stores the scale `-amplitude` as f64. Returns its manifest entry.
fn write_random(
    path: &Path,
    tensors: &[(String, Vec<usize>, f32)],
    fill: &mut Fill,
) -> Result<FileInfo> {
    let plan: Vec<PlannedTensor> = tensors
        .iter()
        .map(|(n, s, amp)| PlannedTensor {
            name: n.clone(),
            dtype: if *amp < 0.0 {
                StDType::F64
            } else {
                StDType::F32
            },
            shape: s.clone(),
        })
        .collect();
    let mut crc = crc32fast::Hasher::new();
    let header = header_bytes(&plan, &pt_metadata());
    crc.update(&header);
    let mut bytes = header.len() as u64;
    let mut w = SafetensorsWriter::create(path, plan, &pt_metadata())?;
    let mut buf: Vec<u8> = Vec::with_capacity(16 << 20);
    for (_, shape, amp) in tensors {
        if *amp < 0.0 {
            let b = (-*amp as f64).to_le_bytes();
            crc.update(&b);
            bytes += 8;
            w.write(&b)?;
            continue;
        }
        let mut left: usize = shape.iter().product();
        while left > 0 {
            let n = left.min(4 << 20);
            buf.clear();
            for _ in 0..n {
                buf.extend_from_slice(&fill.next(*amp).to_le_bytes());
            }
            crc.update(&buf);
            bytes += buf.len() as u64;
            w.write(&buf)?;
            left -= n;
        }
    }
    w.finish()?;
    Ok(FileInfo {
        bytes,
        crc32: crc.finalize(),
    })
}

/// Runs `relora-convert synth`.
pub fn run(a: SynthArgs) -> Result<()> {
    if a.out.exists() {
        bail!("{} exists", a.out.display());
    }
    let mut model = ModelConfig::preset(&a.preset)?;
    model.vocab_size = a.vocab;
    let reset_every = 2000;
    let warm = 5000;
    let train = TrainConfig {
        mode: Mode::Relora,
        steps: warm + reset_every * (a.phases as u64 + 2),
        warmup_steps: 500,
        warmup_full_steps: warm,
        reset_every,
        restart_warmup_steps: 100,
        lora_rank: a.rank,
        lora_alpha: 32.0,
        seq_len: 512.min(model.max_position_embeddings),
        ..TrainConfig::default()
    };
    train.validate()?;
    std::fs::create_dir_all(a.out.join("phases"))?;
    let mut fill = Fill {
        state: a.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
    };
    let all = model.tensor_shapes();
    let dense: Vec<(String, Vec<usize>, f32)> = all
        .iter()
        .filter(|(n, _)| !is_projection(n))
        .map(|(n, s)| (n.clone(), s.clone(), if s.len() == 1 { 1.0 } else { 0.035 }))
        .collect();
    let proj: Vec<(String, Vec<usize>)> =
        all.into_iter().filter(|(n, _)| is_projection(n)).collect();
    let base: Vec<(String, Vec<usize>, f32)> = proj
        .iter()
        .map(|(n, s)| (n.clone(), s.clone(), 0.035))
        .collect();
    let adapter = |with_scale: bool| -> Vec<(String, Vec<usize>, f32)> {
        let mut v = Vec::new();
        for (n, s) in &proj {
            let m = n.trim_end_matches(".weight");
            v.push((
                format!("{m}.lora_A"),
                vec![a.rank, s[1]],
                1.0 / (s[1] as f32).sqrt(),
            ));
            v.push((format!("{m}.lora_B"), vec![s[0], a.rank], 0.01));
            if with_scale {
                v.push((format!("{m}.scale"), vec![1], -(train.lora_scale() as f32)));
            }
        }
        v
    };
    let mut files = BTreeMap::new();
    let t0 = std::time::Instant::now();
    files.insert(
        "params.safetensors".to_string(),
        write_random(&a.out.join("params.safetensors"), &dense, &mut fill)?,
    );
    files.insert(
        "base.safetensors".to_string(),
        write_random(&a.out.join("base.safetensors"), &base, &mut fill)?,
    );
    let mut phases = Vec::new();
    for k in 1..=a.phases {
        let rel = format!("phases/phase-{k:04}.safetensors");
        files.insert(
            rel.clone(),
            write_random(&a.out.join(&rel), &adapter(true), &mut fill)?,
        );
        phases.push(PhaseEntry {
            index: k,
            step: warm + reset_every * k as u64,
            file: rel,
        });
    }
    files.insert(
        "adapters.safetensors".to_string(),
        write_random(
            &a.out.join("adapters.safetensors"),
            &adapter(false),
            &mut fill,
        )?,
    );
    files.insert(
        "optimizer.safetensors".to_string(),
        write_random(&a.out.join("optimizer.safetensors"), &[], &mut fill)?,
    );
    let manifest = Manifest {
        format: FORMAT.to_string(),
        format_version: FORMAT_VERSION,
        writer: format!("relora-convert synth {}", env!("CARGO_PKG_VERSION")),
        model,
        counters: TrainerCounters {
            step: warm + reset_every * a.phases as u64 + reset_every / 2,
            ..TrainerCounters::default()
        },
        phase_index: a.phases,
        adapters_attached: true,
        rngs: TrainerRngs::new(train.seed),
        train,
        data: None,
        tokenizer: None,
        host_state: None,
        optimizer_steps: BTreeMap::new(),
        phases,
        files,
    };
    manifest.write(&a.out)?;
    let total: u64 = manifest.files.values().map(|f| f.bytes).sum();
    eprintln!(
        "wrote {} ({:.2} GB, {} phases of rank {}) in {:.1}s",
        a.out.display(),
        total as f64 / 1e9,
        a.phases,
        a.rank,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
