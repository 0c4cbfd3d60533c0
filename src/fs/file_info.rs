//! The size and CRC-32 of a file: what a checkpoint's manifest records for each of its files,
//! and what a copy of one is checked against.

use serde::{Deserialize, Serialize};

/// Size and checksum of one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Length in bytes.
    pub bytes: u64,
    /// CRC-32 (IEEE) of the whole file.
    pub crc32: u32,
}
