//! A checkpoint opened for streaming export: every file it needs checked against the manifest
//! (size and CRC-32, hashed through memory-mapped windows), every header checked against the
//! model's shape, and then tensors produced one at a time: a stored tensor is mapped straight from
//! its file, an adapted projection is rebuilt as `W_base + sum_k s_k B_k A_k` with the rounding of
//! [`merge_delta`](crate::relora::merge_delta), the trainer's own merge, so the result is bit-identical to
//! the trainer's weights.

use super::manifest::{Manifest, PhaseEntry, MANIFEST_FILE};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::relora::merge::{merge_product, merge_steps};
use crate::tensor_file::dtype::StDType;
use crate::tensor_file::safetensors::{SafetensorsFile, WINDOW_BYTES};
use candle_core::Tensor;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Checks a file of the checkpoint against the manifest's size and CRC-32, hashing it through
/// memory-mapped windows so memory stays small whatever its size and no copy is made.
pub(crate) fn verify_file(dir: &Path, m: &Manifest, rel: &str) -> Result<PathBuf> {
    let info = m.file(dir, rel)?;
    let path = dir.join(rel);
    let (f, len) = crate::fs::read::open_regular(&path).map_err(super::files::damaged)?;
    if len != info.bytes {
        return Err(Error::checkpoint(
            &path,
            format!(
                "is {len} bytes, the manifest says {} (truncated or replaced)",
                info.bytes
            ),
        ));
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(WINDOW_BYTES as u64) as usize;
        // SAFETY: a read-only private mapping of a file whose length was just checked; as with
        // any mmap reader, a concurrent truncation by another process would fault the read.
        let map = unsafe { memmap2::MmapOptions::new().offset(at).len(n).map(&f) }
            .map_err(|e| Error::io(&path, e))?;
        hasher.update(&map);
        at += n as u64;
    }
    let crc = hasher.finalize();
    if crc != info.crc32 {
        return Err(Error::checkpoint(
            &path,
            format!(
                "checksum {crc:08x} differs from the manifest's {:08x} (corrupt)",
                info.crc32
            ),
        ));
    }
    Ok(path)
}

/// One completed phase's file and the scale of each module in it.
struct PhaseFile {
    entry: PhaseEntry,
    file: SafetensorsFile,
    scales: HashMap<String, f64>,
}

/// A validated checkpoint from which tensors are produced one at a time.
pub struct CheckpointSource {
    dir: PathBuf,
    manifest: Manifest,
    params: SafetensorsFile,
    base: Option<SafetensorsFile>,
    phases: Vec<PhaseFile>,
    adapters: Option<SafetensorsFile>,
    /// Adapted modules (`model.layers.0.self_attn.q_proj`), in model order.
    modules: Vec<String>,
    expected: Vec<(String, Vec<usize>)>,
    dtype: StDType,
}

impl CheckpointSource {
    /// Opens and fully validates a checkpoint directory, checksums included.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, true)
    }

    /// Like [`CheckpointSource::open`]; `verify = false` skips the checksum pass (headers and
    /// shapes are still checked), for quick inspection.
    pub(crate) fn open_with(dir: &Path, verify: bool) -> Result<Self> {
        let m = Manifest::read(dir)?;
        for (i, p) in m.phases.iter().enumerate() {
            if p.index != i + 1 {
                return Err(Error::checkpoint(
                    dir.join(MANIFEST_FILE),
                    format!(
                        "the phase sequence has a gap: expected phase {}, found phase {} ({})",
                        i + 1,
                        p.index,
                        p.file
                    ),
                ));
            }
        }
        if !m.adapters_attached && !m.phases.is_empty() {
            return Err(Error::checkpoint(
                dir,
                "the manifest lists phases but no adapters are attached",
            ));
        }
        let dtype = match m.train.dtype.as_str() {
            "f32" => StDType::F32,
            "f64" => StDType::F64,
            other => {
                return Err(Error::checkpoint(
                    dir,
                    format!("unsupported parameter dtype '{other}'"),
                ))
            }
        };
        let open = |rel: &str| -> Result<SafetensorsFile> {
            let path = if verify {
                verify_file(dir, &m, rel)?
            } else {
                m.file(dir, rel)?;
                dir.join(rel)
            };
            SafetensorsFile::open(&path)
        };
        let params = open("params.safetensors")?;
        let (base, adapters) = if m.adapters_attached {
            (
                Some(open("base.safetensors")?),
                Some(open("adapters.safetensors")?),
            )
        } else {
            (None, None)
        };
        let mut phases = Vec::with_capacity(m.phases.len());
        for entry in &m.phases {
            let file = open(&entry.file)?;
            phases.push(PhaseFile {
                entry: entry.clone(),
                file,
                scales: HashMap::new(),
            });
        }
        // Every weight is stored in params or base, so their size bounds the model: a manifest
        // claiming more is refused before the tensor list (one entry per layer) is built.
        let stored = params.len() + base.as_ref().map_or(0, SafetensorsFile::len);
        m.check_weights_fit(dir, stored, dtype.size(), &dtype.to_string())?;
        let expected = m.model.tensor_shapes();
        let mut src = CheckpointSource {
            dir: dir.to_path_buf(),
            manifest: m,
            params,
            base,
            phases,
            adapters,
            modules: Vec::new(),
            expected,
            dtype,
        };
        src.validate()?;
        Ok(src)
    }

    /// Checks every header against the model: the stored weights are exactly the model's tensors
    /// (split between params and base), every phase and the current adapters cover exactly the
    /// adapted projections with consistent shapes, and every dtype is the run's.
    fn validate(&mut self) -> Result<()> {
        let shapes: HashMap<&str, &Vec<usize>> =
            self.expected.iter().map(|(n, s)| (n.as_str(), s)).collect();
        let check = |file: &SafetensorsFile, name: &str, shape: &[usize], dtype: StDType| {
            let t = file.info(name)?;
            if t.shape != shape {
                return Err(Error::checkpoint(
                    file.path(),
                    format!("tensor {name} has shape {:?}, expected {shape:?}", t.shape),
                ));
            }
            if t.dtype != dtype {
                return Err(Error::checkpoint(
                    file.path(),
                    format!("tensor {name} is {}, expected {dtype}", t.dtype),
                ));
            }
            Ok(())
        };
        let mut stored: BTreeSet<String> = BTreeSet::new();
        for file in std::iter::once(&self.params).chain(self.base.iter()) {
            for t in file.tensors() {
                let Some(shape) = shapes.get(t.name.as_str()) else {
                    return Err(Error::checkpoint(
                        file.path(),
                        format!(
                            "unexpected tensor {} (not a parameter of this model)",
                            t.name
                        ),
                    ));
                };
                check(file, &t.name, shape, self.dtype)?;
                if !stored.insert(t.name.clone()) {
                    return Err(Error::checkpoint(
                        &self.dir,
                        format!("tensor {} is in both params and base", t.name),
                    ));
                }
            }
        }
        if let Some((name, _)) = self.expected.iter().find(|(n, _)| !stored.contains(n)) {
            let file = if self.base.is_some() && is_projection(name) {
                "base.safetensors"
            } else {
                "params.safetensors"
            };
            return Err(Error::checkpoint(
                self.dir.join(file),
                format!("tensor {name} is missing"),
            ));
        }
        let Some(base) = &self.base else {
            return Ok(());
        };
        self.modules = self
            .expected
            .iter()
            .filter(|(n, _)| base.get(n).is_some())
            .map(|(n, _)| n.trim_end_matches(".weight").to_string())
            .collect();
        if let Some(m) = self.modules.iter().find(|m| !is_projection(m)) {
            return Err(Error::checkpoint(
                base.path(),
                format!("{m}.weight is not a projection and cannot carry an adapter"),
            ));
        }
        let rank = self.manifest.train.lora_rank;
        let adapter_shapes = |module: &str| -> (Vec<usize>, Vec<usize>, usize) {
            let w = shapes[format!("{module}.weight").as_str()];
            (vec![rank, w[1]], vec![w[0], rank], w[1])
        };
        let adapters = self.adapters.as_ref().expect("present when base is");
        for module in &self.modules {
            let (a, b, _) = adapter_shapes(module);
            check(adapters, &format!("{module}.lora_A"), &a, self.dtype)?;
            check(adapters, &format!("{module}.lora_B"), &b, self.dtype)?;
        }
        if adapters.tensors().len() != 2 * self.modules.len() {
            let extra = adapters
                .names()
                .into_iter()
                .find(|n| {
                    !self
                        .modules
                        .iter()
                        .any(|m| n == &format!("{m}.lora_A") || n == &format!("{m}.lora_B"))
                })
                .unwrap_or_default();
            return Err(Error::checkpoint(
                adapters.path(),
                format!("unexpected tensor {extra}"),
            ));
        }
        for phase in &mut self.phases {
            let f = &phase.file;
            for module in &self.modules {
                let (a, b, _) = adapter_shapes(module);
                check(f, &format!("{module}.lora_A"), &a, self.dtype)?;
                check(f, &format!("{module}.lora_B"), &b, self.dtype)?;
                let scale = f.scalar_f64(&format!("{module}.scale"))?;
                if !scale.is_finite() {
                    return Err(Error::checkpoint(
                        f.path(),
                        format!("{module}.scale is {scale}"),
                    ));
                }
                phase.scales.insert(module.clone(), scale);
            }
            if f.tensors().len() != 3 * self.modules.len() {
                let extra = f
                    .names()
                    .into_iter()
                    .find(|n| {
                        let m = n.rsplit_once('.').map(|(m, _)| m).unwrap_or("");
                        !self.modules.iter().any(|x| x == m)
                    })
                    .unwrap_or_default();
                return Err(Error::checkpoint(
                    f.path(),
                    format!("unexpected tensor {extra} in phase {}", phase.entry.index),
                ));
            }
        }
        Ok(())
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.manifest.model
    }

    /// The model's tensors (names and shapes) in model order.
    pub fn expected(&self) -> &[(String, Vec<usize>)] {
        &self.expected
    }

    /// The projections that carry adapters (module paths), in model order; empty before the switch.
    pub(crate) fn adapted_modules(&self) -> &[String] {
        &self.modules
    }

    /// Whether adapters are attached.
    pub fn has_adapters(&self) -> bool {
        self.base.is_some()
    }

    /// Number of completed phases.
    pub(crate) fn phase_count(&self) -> usize {
        self.phases.len()
    }

    /// Whether `{module}.weight` is an adapted projection's weight.
    pub(crate) fn is_adapted(&self, weight_name: &str) -> bool {
        weight_name
            .strip_suffix(".weight")
            .is_some_and(|m| self.modules.iter().any(|x| x == m))
    }

    /// The file and name under which a non-adapted tensor is stored.
    pub fn stored(&self, name: &str) -> Result<&SafetensorsFile> {
        self.params.info(name)?;
        Ok(&self.params)
    }

    /// The file of base weights (adapted projections as of the switch to adapters).
    pub(crate) fn base_file(&self) -> Result<&SafetensorsFile> {
        self.base.as_ref().ok_or_else(|| {
            Error::checkpoint(&self.dir, "no base weights: adapters were never attached")
        })
    }

    /// An adapted projection's base weight (as of the switch to adapters).
    pub(crate) fn base_weight(&self, module: &str) -> Result<Tensor> {
        self.base_file()?.tensor(&format!("{module}.weight"))
    }

    /// A projection's weight after the first `upto` phases, plus the current adapter when
    /// `current`: the products `B_k A_k` are computed first, then the base is read straight from
    /// its mapped file and every scaled product added in one pass, element by element in the
    /// trainer's order with the trainer's rounding, so the result is bit-identical to applying [`merge_delta`](crate::relora::merge_delta) once per phase.
    pub(crate) fn merged_projection(
        &self,
        module: &str,
        upto: usize,
        current: bool,
    ) -> Result<Tensor> {
        let mut steps = Vec::with_capacity(upto + 1);
        for p in self.phases.iter().take(upto) {
            let a = p.file.tensor(&format!("{module}.lora_A"))?;
            let b = p.file.tensor(&format!("{module}.lora_B"))?;
            steps.push((merge_product(module, &a, &b)?, p.scales[module]));
        }
        if current {
            let (a, b) = self.current_adapter(module)?;
            steps.push((
                merge_product(module, &a, &b)?,
                self.manifest.train.lora_scale(),
            ));
        }
        let base = self.base_file()?;
        let name = format!("{module}.weight");
        let info = base.info(&name)?;
        let bytes = base.map(&name)?;
        merge_steps(module, &bytes, info.dtype, &info.shape, &steps)
    }

    /// The current (unmerged) adapter of `module`: `(A [r, in], B [out, r])`.
    pub(crate) fn current_adapter(&self, module: &str) -> Result<(Tensor, Tensor)> {
        let f = self
            .adapters
            .as_ref()
            .ok_or_else(|| Error::checkpoint(&self.dir, "no adapters are attached"))?;
        Ok((
            f.tensor(&format!("{module}.lora_A"))?,
            f.tensor(&format!("{module}.lora_B"))?,
        ))
    }

    /// The file of current adapters (`{module}.lora_A` / `.lora_B`).
    pub(crate) fn current_adapter_file(&self) -> Result<&SafetensorsFile> {
        self.adapters
            .as_ref()
            .ok_or_else(|| Error::checkpoint(&self.dir, "no adapters are attached"))
    }

    /// Any tensor's current value: an adapted projection fully merged (every phase and the
    /// current adapter), anything else as stored.
    pub fn weight(&self, name: &str) -> Result<Tensor> {
        if self.is_adapted(name) {
            let module = name.trim_end_matches(".weight");
            self.merged_projection(module, self.phases.len(), true)
        } else {
            self.params.tensor(name)
        }
    }

    /// Checks a requested `--upto-phase` and turns it into (phases to apply, include the current
    /// adapter): `None` means everything, current adapter included; `Some(n)` the first n phases.
    pub fn resolve_upto(&self, upto: Option<usize>) -> Result<(usize, bool)> {
        match upto {
            None => Ok((self.phases.len(), self.has_adapters())),
            Some(n) if n <= self.phases.len() => Ok((n, false)),
            Some(n) => Err(Error::checkpoint(
                &self.dir,
                format!(
                    "phase {n} was requested but the checkpoint has {} completed phase{}",
                    self.phases.len(),
                    if self.phases.len() == 1 { "" } else { "s" }
                ),
            )),
        }
    }
}

/// Whether a module path or weight name is one of the seven adaptable projections.
pub fn is_projection(name: &str) -> bool {
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let short = module.rsplit('.').next().unwrap_or("");
    crate::config::ALL_TARGETS.contains(&short)
}

#[cfg(test)]
mod tests {
    use super::super::load::tests::{saved_checkpoint, write_edited};
    use super::*;

    #[test]
    fn a_model_bigger_than_the_stored_weights_is_refused_before_listing_its_tensors() {
        // Found by fuzzing (fuzz/seeds/manifest/huge-layers.json): a manifest claiming millions
        // of layers made opening the checkpoint build a tensor list of that many entries (tens
        // of GB) before any header was compared with it.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        saved_checkpoint(&dir);
        let src = CheckpointSource::open(&dir).unwrap();
        assert_eq!(src.expected().len(), 2 + 9 * 2 + 1);
        let original = src.manifest().clone();
        // 2^24 layers of the tiny shape: under the parameter limit, far beyond the files.
        write_edited(&dir, &original, |m| m.model.num_hidden_layers = 1 << 24);
        for verify in [true, false] {
            let err = CheckpointSource::open_with(&dir, verify)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("bytes of weights (F32)"), "{err}");
        }
    }
}
