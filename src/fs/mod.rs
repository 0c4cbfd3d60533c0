//! File-system primitives every floor above uses: reads that accept only regular files and are
//! bounded by their length ([`read`]), a file's size and checksum ([`file_info`]), and outputs
//! that appear whole or not at all and replace only what relora itself wrote ([`output`], with
//! [`ownership`] telling relora's own output from anything else).

pub mod file_info;
pub mod output;
pub mod ownership;
pub mod read;
