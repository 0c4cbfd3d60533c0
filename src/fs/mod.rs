//! File-system primitives every floor above uses: reads that accept only regular files and are
//! bounded by their length ([`read`]), and outputs that appear whole or not at all and replace
//! only what relora itself wrote ([`output`]).

pub mod output;
pub mod read;
