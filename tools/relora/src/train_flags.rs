//! Configuration errors in the words of the command line: the library names options by their
//! keys (`warmup_steps 30 must be below steps 20`, as the C API and `--set` spell them); `relora
//! train` says which flag to change (`--warmup-steps 30 must be below --steps 20`), and for keys
//! without a flag of their own, how to set them (`--set KEY=VALUE`).

/// Training option keys and the `relora train` flag that sets each.
pub const FLAGS: &[(&str, &str)] = &[
    ("steps", "--steps"),
    ("lr", "--lr"),
    ("batch_size", "--batch-size"),
    ("seq_len", "--seq-len"),
    ("lora_rank", "--rank"),
    ("reset_every", "--reset-every"),
    ("warmup_steps", "--warmup-steps"),
    ("warmup_full_steps", "--warmup-full-steps"),
    ("seed", "--seed"),
    ("mode", "--mode"),
];

/// Whether `b` can be part of an option key.
fn is_key_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'
}

/// `msg` with every whole-word option key that has a flag replaced by the flag, and a note
/// for the keys that are only set with `--set`.
pub fn name_flags(msg: &str) -> String {
    let keys = relora::config::TrainConfig::keys();
    let bytes = msg.as_bytes();
    let mut out = String::with_capacity(msg.len() + 16);
    let mut set_only: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if is_key_byte(bytes[i]) && (i == 0 || !is_key_byte(bytes[i - 1])) {
            let end = (i..bytes.len())
                .find(|&j| !is_key_byte(bytes[j]))
                .unwrap_or(bytes.len());
            let word = &msg[i..end];
            match FLAGS.iter().find(|(k, _)| *k == word) {
                Some((_, flag)) => out.push_str(flag),
                None => {
                    if let Some(k) = keys.iter().find(|k| k.as_str() == word) {
                        if !set_only.contains(&k.as_str()) {
                            set_only.push(k);
                        }
                    }
                    out.push_str(word);
                }
            }
            i = end;
        } else {
            let c = msg[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    if !set_only.is_empty() {
        let how: Vec<String> = set_only.iter().map(|k| format!("--set {k}=...")).collect();
        out.push_str(&format!(" (set with {})", how.join(", ")));
    }
    out
}

/// `e` with its configuration message in flag names (see [`name_flags`]), other errors as
/// they are.
pub fn in_flag_names(e: anyhow::Error) -> anyhow::Error {
    let config = e
        .chain()
        .find_map(|c| match c.downcast_ref::<relora::Error>() {
            Some(relora::Error::Config(m)) => Some(m.clone()),
            _ => None,
        });
    match config {
        Some(msg) => {
            let renamed = name_flags(&msg);
            anyhow::anyhow!(relora::error::report(e.as_ref()).replace(&msg, &renamed))
        }
        None => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Command};

    #[test]
    fn keys_become_the_flags_that_set_them() {
        assert_eq!(
            name_flags("warmup_steps 30 must be below steps 20"),
            "--warmup-steps 30 must be below --steps 20"
        );
        assert_eq!(
            name_flags("restart_warmup_steps 5 must be below reset_every 4"),
            "restart_warmup_steps 5 must be below --reset-every 4 (set with --set \
             restart_warmup_steps=...)"
        );
        // Parts of words and other text stay.
        assert_eq!(
            name_flags("the steps' lr, stepsize"),
            "the --steps' --lr, stepsize"
        );
        assert_eq!(name_flags("é lora_rank"), "é --rank");
    }

    #[test]
    fn every_flag_exists_and_every_key_is_an_option() {
        let cmd = crate::train::TrainArgs::augment_args(Command::new("train"));
        let keys = relora::config::TrainConfig::keys();
        for (key, flag) in FLAGS {
            let long = flag.trim_start_matches("--");
            assert!(
                cmd.get_arguments().any(|a| a.get_long() == Some(long)),
                "{flag} is not a flag of relora train"
            );
            assert!(keys.iter().any(|k| k == key), "{key} is not an option key");
        }
    }
}
