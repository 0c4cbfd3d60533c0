//! Element types of safetensors files and the conversions an export performs.
//!
//! Conversions round to nearest, ties to even (the `half` crate for 16-bit types, `as f32` for
//! f64 -> f32), so an export agrees bit for bit with PyTorch's `tensor.to(dtype)`.

use crate::error::{Error, Result};
use half::{bf16, f16};
use std::fmt;

/// The element types this crate reads from and writes to safetensors files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StDType {
    /// IEEE binary64.
    F64,
    /// IEEE binary32.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE binary16.
    F16,
    /// Signed 64-bit integers (seen in foreign files; never converted).
    I64,
    /// Signed 32-bit integers.
    I32,
    /// Unsigned bytes.
    U8,
    /// Booleans, one byte each.
    Bool,
}

impl StDType {
    /// The dtype's name in a safetensors header (`"F32"`, `"BF16"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            StDType::F64 => "F64",
            StDType::F32 => "F32",
            StDType::BF16 => "BF16",
            StDType::F16 => "F16",
            StDType::I64 => "I64",
            StDType::I32 => "I32",
            StDType::U8 => "U8",
            StDType::Bool => "BOOL",
        }
    }

    /// Parses a safetensors header dtype; `None` for types this crate does not handle.
    pub(crate) fn from_name(name: &str) -> Option<StDType> {
        Some(match name {
            "F64" => StDType::F64,
            "F32" => StDType::F32,
            "BF16" => StDType::BF16,
            "F16" => StDType::F16,
            "I64" => StDType::I64,
            "I32" => StDType::I32,
            "U8" => StDType::U8,
            "BOOL" => StDType::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StDType::F64 | StDType::I64 => 8,
            StDType::F32 | StDType::I32 => 4,
            StDType::BF16 | StDType::F16 => 2,
            StDType::U8 | StDType::Bool => 1,
        }
    }

    /// Whether values of this type can be converted to a float export type.
    pub(crate) fn is_float(self) -> bool {
        matches!(
            self,
            StDType::F64 | StDType::F32 | StDType::BF16 | StDType::F16
        )
    }

    /// The matching candle dtype, for the types candle has.
    pub(crate) fn to_candle(self) -> Option<candle_core::DType> {
        use candle_core::DType;
        Some(match self {
            StDType::F64 => DType::F64,
            StDType::F32 => DType::F32,
            StDType::BF16 => DType::BF16,
            StDType::F16 => DType::F16,
            StDType::I64 => DType::I64,
            StDType::I32 => DType::I32,
            StDType::U8 => DType::U8,
            StDType::Bool => return None,
        })
    }

    /// The safetensors type of a candle dtype, for the float types an export handles.
    pub(crate) fn from_candle(dtype: candle_core::DType) -> Option<StDType> {
        use candle_core::DType;
        Some(match dtype {
            DType::F64 => StDType::F64,
            DType::F32 => StDType::F32,
            DType::BF16 => StDType::BF16,
            DType::F16 => StDType::F16,
            DType::I64 => StDType::I64,
            DType::I32 => StDType::I32,
            DType::U8 => StDType::U8,
            _ => return None,
        })
    }
}

impl fmt::Display for StDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The element type of an exported model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ExportDType {
    /// fp32: exact, what the logit comparisons use.
    #[default]
    F32,
    /// bfloat16: half the size, the usual type for serving.
    BF16,
    /// IEEE half precision.
    F16,
}

impl ExportDType {
    /// The safetensors type written.
    pub fn st(self) -> StDType {
        match self {
            ExportDType::F32 => StDType::F32,
            ExportDType::BF16 => StDType::BF16,
            ExportDType::F16 => StDType::F16,
        }
    }

    /// PyTorch's name for it, as `config.json`'s `torch_dtype` / `dtype` want it.
    pub fn torch_name(self) -> &'static str {
        match self {
            ExportDType::F32 => "float32",
            ExportDType::BF16 => "bfloat16",
            ExportDType::F16 => "float16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        self.st().size()
    }
}

impl std::str::FromStr for ExportDType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(ExportDType::F32),
            "bf16" | "bfloat16" => Ok(ExportDType::BF16),
            "f16" | "fp16" | "float16" | "half" => Ok(ExportDType::F16),
            other => Err(Error::Config(format!(
                "export dtype '{other}' (expected f32, bf16 or f16)"
            ))),
        }
    }
}

impl fmt::Display for ExportDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExportDType::F32 => "f32",
            ExportDType::BF16 => "bf16",
            ExportDType::F16 => "f16",
        })
    }
}

fn le2(b: &[u8]) -> [u8; 2] {
    [b[0], b[1]]
}
fn le4(b: &[u8]) -> [u8; 4] {
    [b[0], b[1], b[2], b[3]]
}
fn le8(b: &[u8]) -> [u8; 8] {
    [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]
}

/// Appends `src` (little-endian elements of type `from`) to `out` converted to `to`.
/// `src` must hold whole elements. Integer types are only copied, never converted.
pub fn convert_into(src: &[u8], from: StDType, to: StDType, out: &mut Vec<u8>) -> Result<()> {
    if !src.len().is_multiple_of(from.size()) {
        return Err(Error::Data(format!(
            "{} bytes is not a whole number of {from} elements",
            src.len()
        )));
    }
    if from == to {
        out.extend_from_slice(src);
        return Ok(());
    }
    if !from.is_float() || !to.is_float() {
        return Err(Error::Data(format!("cannot convert {from} to {to}")));
    }
    let n = src.len() / from.size();
    out.reserve(n * to.size());
    macro_rules! each {
        ($width:expr, $read:expr, $write:expr) => {
            for c in src.chunks_exact($width) {
                let v = $read(c);
                out.extend_from_slice(&$write(v));
            }
        };
    }
    let f32_of = |c: &[u8]| f32::from_le_bytes(le4(c));
    let f64_of = |c: &[u8]| f64::from_le_bytes(le8(c));
    let bf16_of = |c: &[u8]| bf16::from_le_bytes(le2(c));
    let f16_of = |c: &[u8]| f16::from_le_bytes(le2(c));
    match (from, to) {
        (StDType::F32, StDType::BF16) => {
            each!(4, f32_of, |v: f32| bf16::from_f32(v).to_le_bytes())
        }
        (StDType::F32, StDType::F16) => each!(4, f32_of, |v: f32| f16::from_f32(v).to_le_bytes()),
        (StDType::F32, StDType::F64) => each!(4, f32_of, |v: f32| (v as f64).to_le_bytes()),
        (StDType::F64, StDType::F32) => each!(8, f64_of, |v: f64| (v as f32).to_le_bytes()),
        (StDType::F64, StDType::BF16) => {
            each!(8, f64_of, |v: f64| bf16::from_f64(v).to_le_bytes())
        }
        (StDType::F64, StDType::F16) => each!(8, f64_of, |v: f64| f16::from_f64(v).to_le_bytes()),
        (StDType::BF16, StDType::F32) => each!(2, bf16_of, |v: bf16| v.to_f32().to_le_bytes()),
        (StDType::BF16, StDType::F64) => each!(2, bf16_of, |v: bf16| v.to_f64().to_le_bytes()),
        (StDType::BF16, StDType::F16) => {
            each!(2, bf16_of, |v: bf16| f16::from_f32(v.to_f32())
                .to_le_bytes())
        }
        (StDType::F16, StDType::F32) => each!(2, f16_of, |v: f16| v.to_f32().to_le_bytes()),
        (StDType::F16, StDType::F64) => each!(2, f16_of, |v: f16| v.to_f64().to_le_bytes()),
        (StDType::F16, StDType::BF16) => {
            each!(2, f16_of, |v: f16| bf16::from_f32(v.to_f32()).to_le_bytes())
        }
        _ => unreachable!("every pair of distinct float types is listed above"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_f32(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn conversions_round_to_nearest_even_and_agree_with_candle() {
        let vals = [
            1.0f32,
            -2.5,
            1.0 + f32::EPSILON,
            3.3e-3,
            65504.0,
            1e-8,
            -0.0,
        ];
        let dev = candle_core::Device::Cpu;
        let t = candle_core::Tensor::new(&vals[..], &dev).unwrap();
        for (to, cd) in [
            (StDType::BF16, candle_core::DType::BF16),
            (StDType::F16, candle_core::DType::F16),
        ] {
            let mut out = Vec::new();
            convert_into(&bytes_f32(&vals), StDType::F32, to, &mut out).unwrap();
            let back = t.to_dtype(cd).unwrap();
            let (storage, _) = back.storage_and_layout();
            let expect: Vec<u8> = match &*storage {
                candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => {
                    v.iter().flat_map(|x| x.to_le_bytes()).collect()
                }
                candle_core::Storage::Cpu(candle_core::CpuStorage::F16(v)) => {
                    v.iter().flat_map(|x| x.to_le_bytes()).collect()
                }
                _ => unreachable!(),
            };
            assert_eq!(out, expect, "{to}");
            // Back to f32 and down again is the identity on 16-bit values.
            let mut wide = Vec::new();
            convert_into(&out, to, StDType::F32, &mut wide).unwrap();
            let mut again = Vec::new();
            convert_into(&wide, StDType::F32, to, &mut again).unwrap();
            assert_eq!(again, out);
        }
        // bf16 of 1 + eps rounds to 1 (ties and below go to even).
        let mut out = Vec::new();
        convert_into(
            &bytes_f32(&[1.0 + f32::EPSILON]),
            StDType::F32,
            StDType::BF16,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, bf16::from_f32(1.0).to_le_bytes());
        assert!(convert_into(&[0u8; 3], StDType::F32, StDType::F16, &mut out).is_err());
        assert!(convert_into(&[0u8; 8], StDType::I64, StDType::F32, &mut out).is_err());
    }

    #[test]
    fn names_parse_both_ways() {
        for d in [
            StDType::F64,
            StDType::F32,
            StDType::BF16,
            StDType::F16,
            StDType::I64,
            StDType::I32,
            StDType::U8,
            StDType::Bool,
        ] {
            assert_eq!(StDType::from_name(d.name()), Some(d));
        }
        assert_eq!("bf16".parse::<ExportDType>().unwrap(), ExportDType::BF16);
        assert_eq!("F32".parse::<ExportDType>().unwrap(), ExportDType::F32);
        assert!("int8".parse::<ExportDType>().is_err());
    }
}
