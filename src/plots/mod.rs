//! Charts as PNG files with no plotting library: a small canvas and its PNG encoder ([`png`]), and
//! training curves of several runs ([`curves`]).

pub mod curves;
pub mod png;
