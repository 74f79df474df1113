//! I/O tokens are secrets: whoever holds one can claim a process's stdio.
//! Logs name a token by a short prefix only.

use std::fmt;

/// How many characters of a token a log line shows.
pub const PREFIX_CHARS: usize = 8;

/// A token as logs show it: its first [`PREFIX_CHARS`] characters and
/// `…` (a token that short is shown whole). For tracing fields:
/// `info!(token = %Token(&t), …)`.
#[derive(Debug, Clone, Copy)]
pub struct Token<'a>(pub &'a str);

impl fmt::Display for Token<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(PREFIX_CHARS) {
            Some((at, _)) => write!(f, "{}…", &self.0[..at]),
            None => f.write_str(self.0),
        }
    }
}

/// `token` shortened for a log line.
pub fn token(token: &str) -> String {
    Token(token).to_string()
}

/// `msg` with every string shaped like one of the daemon's tokens (43
/// base64url characters and `=`: 32 random bytes) shortened, for logging
/// an error message that may quote one.
pub fn tokens_in(msg: &str) -> String {
    const TOKEN_LEN: usize = 44;
    let is_b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    let b = msg.as_bytes();
    let mut out = String::with_capacity(msg.len());
    let mut i = 0;
    let mut copied = 0;
    while i < b.len() {
        if !is_b64(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && is_b64(b[i]) {
            i += 1;
        }
        let starts_run = start == 0 || !is_b64(b[start - 1]);
        if starts_run && i - start == TOKEN_LEN - 1 && b.get(i) == Some(&b'=') {
            // All ASCII: byte offsets are char boundaries here.
            out.push_str(&msg[copied..start]);
            out.push_str(&token(&msg[start..=i]));
            i += 1;
            copied = i;
        }
    }
    out.push_str(&msg[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_logged_as_a_prefix() {
        let t = crate::server::new_token();
        let shown = token(&t);
        assert_eq!(shown, format!("{}…", &t[..8]));
        assert!(!shown.contains(&t[8..]));
        assert_eq!(format!("{}", Token("abc")), "abc");
        assert_eq!(format!("{}", Token("12345678")), "12345678");
        assert_eq!(format!("{}", Token("123456789")), "12345678…");
        // Not cut inside a multi-byte character.
        assert_eq!(token("ééééééééé"), "éééééééé…");
    }

    #[test]
    fn tokens_in_messages_are_shortened() {
        let t = crate::server::new_token();
        let u = crate::server::new_token();
        let msg = format!("token {t:?} is already claimed; {u} too");
        let got = tokens_in(&msg);
        assert_eq!(
            got,
            format!(
                "token \"{}…\" is already claimed; {}… too",
                &t[..8],
                &u[..8]
            )
        );
        // Other words, and longer base64 runs, are left alone.
        let plain = "unknown token \"bogus\"";
        assert_eq!(tokens_in(plain), plain);
        let long = format!("x{t}");
        assert_eq!(tokens_in(&long), long);
        assert_eq!(tokens_in(""), "");
    }
}
