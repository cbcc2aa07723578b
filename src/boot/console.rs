//! The serial console log, read as it grows.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

/// The serial console log, read as it grows.
pub(super) struct Console {
    pub(super) path: PathBuf,
    /// Bytes read so far (always up to a line end).
    pub(super) offset: u64,
    /// The log so far, without terminal codes.
    pub(super) text: String,
}

impl Console {
    pub(super) fn new(path: PathBuf) -> Console {
        Console {
            path,
            offset: 0,
            text: String::new(),
        }
    }

    pub(super) fn has_output(&self) -> bool {
        fs::metadata(&self.path).is_ok_and(|m| m.len() > 0)
    }

    /// Reads the complete lines written since the last call; returns them.
    pub(super) fn refresh(&mut self) -> String {
        let Ok(mut file) = File::open(&self.path) else {
            return String::new();
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return String::new();
        }
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_err() {
            return String::new();
        }
        let Some(end) = bytes.iter().rposition(|&b| b == b'\n') else {
            return String::new();
        };
        self.offset += end as u64 + 1;
        let fresh = strip_terminal_codes(&bytes[..=end]);
        self.text.push_str(&fresh);
        fresh
    }
}

/// The console's text without ANSI escape sequences and control characters
/// (systemd colors its status lines; getty queries the terminal).
pub(super) fn strip_terminal_codes(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters and intermediates, then one final byte.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('\u{40}'..='\u{7e}').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \.
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' {
                            chars.next();
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_codes_are_stripped() {
        let raw = b"[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39mmulti-user.target\x1b[0m - Multi-User System.\r\n\
                    \x1b[!p\x1b]104\x07\x1b[?7h\x1b[6n\x1b[32766;32766H\x1b[6nDebian\n";
        let text = strip_terminal_codes(raw);
        assert_eq!(
            text,
            "[  OK  ] Reached target multi-user.target - Multi-User System.\nDebian\n"
        );
    }
}
