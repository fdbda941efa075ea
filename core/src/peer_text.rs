//! Text that came from a peer (a CONNECT authority, a header, a CSR's SAN, a gRPC message),
//! made safe to put in a log line or an error message: at most [`PEER_TEXT_MAX`] bytes with a
//! marker saying how long it really was, and control characters escaped so that a peer cannot
//! start a forged log line. Without the bound, anyone who can reach a port can make each of
//! their refused requests cost a 20 KB log line.

use std::fmt;

/// How much of a peer's text a log line keeps.
pub const PEER_TEXT_MAX: usize = 256;

/// How much of an error that may carry a peer's text (an HTTP/2 GOAWAY's debug data, a TLS
/// alert, a refusal naming what was asked) a log line keeps.
pub const PEER_ERROR_MAX: usize = 1024;

/// A bounded, escaped copy of a peer's text. Its `Display` is the text (control characters
/// escaped) followed, when it was cut, by `...[truncated, N bytes]`; its `Debug` is the same,
/// quoted.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PeerText {
    kept: String,
    /// Length of the whole text, in bytes.
    total: usize,
}

impl PeerText {
    /// Keeps at most [`PEER_TEXT_MAX`] bytes of `text`.
    pub fn new(text: &str) -> Self {
        Self::with_limit(text, PEER_TEXT_MAX)
    }

    /// Keeps at most `max` bytes of `text` (cut at a character boundary).
    pub fn with_limit(text: &str, max: usize) -> Self {
        PeerText {
            kept: cut(text, max).to_owned(),
            total: text.len(),
        }
    }

    /// Like [`PeerText::new`] for bytes that may not be UTF-8 (a header value): invalid
    /// sequences are shown as U+FFFD.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let head = &bytes[..bytes.len().min(PEER_TEXT_MAX)];
        let mut t = Self::new(&String::from_utf8_lossy(head));
        t.total = bytes.len();
        t
    }

    /// Bounds what `value` displays (an error whose message carries peer input) to `max` bytes.
    /// Only those are kept as it is formatted; the rest is counted, not copied (an error can
    /// carry a 1 MiB GOAWAY's debug data).
    pub fn display(value: &dyn fmt::Display, max: usize) -> Self {
        /// Keeps what fits in `max`, up to the first piece that does not; counts everything.
        struct Keep {
            text: PeerText,
            max: usize,
            full: bool,
        }
        impl fmt::Write for Keep {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                if !self.full {
                    let part = cut(s, self.max - self.text.kept.len());
                    self.text.kept.push_str(part);
                    self.full = part.len() < s.len();
                }
                self.text.total += s.len();
                Ok(())
            }
        }
        let mut keep = Keep {
            text: PeerText {
                kept: String::new(),
                total: 0,
            },
            max,
            full: false,
        };
        let _ = fmt::write(&mut keep, format_args!("{value}"));
        keep.text
    }

    /// Whether part of the text was cut.
    pub fn truncated(&self) -> bool {
        self.kept.len() < self.total
    }

    fn write_escaped(&self, f: &mut fmt::Formatter<'_>, quote: bool) -> fmt::Result {
        use fmt::Write;
        if quote {
            f.write_char('"')?;
        }
        for c in self.kept.chars() {
            if c.is_control() || (quote && (c == '"' || c == '\\')) {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        // Inside the quotes: a quoted field stays one token on a text line.
        if self.truncated() {
            write!(f, "{}", Truncated(self.total))?;
        }
        if quote {
            f.write_char('"')?;
        }
        Ok(())
    }
}

/// `text` cut to at most `max` bytes (at a character boundary) and marked as
/// [`PeerText`] marks it, but not escaped: for a field the log formatter quotes and escapes
/// itself (a `&str` field). Borrowed when it fits.
pub fn bounded(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(format!("{}{}", cut(text, max), Truncated(text.len())))
}

/// The longest start of `text` of at most `max` bytes that ends at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The marker after cut text: how long the whole was.
struct Truncated(usize);

impl fmt::Display for Truncated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "...[truncated, {} bytes]", self.0)
    }
}

impl fmt::Display for PeerText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_escaped(f, false)
    }
}

impl fmt::Debug for PeerText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_escaped(f, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_whole() {
        let t = PeerText::new("10.0.0.1:80");
        assert!(!t.truncated());
        assert_eq!(t.to_string(), "10.0.0.1:80");
        assert_eq!(format!("{t:?}"), "\"10.0.0.1:80\"");
    }

    #[test]
    fn long_text_is_cut_with_a_marker() {
        let long = "a".repeat(20_000);
        let t = PeerText::new(&long);
        assert!(t.truncated());
        let shown = t.to_string();
        assert!(shown.starts_with(&"a".repeat(PEER_TEXT_MAX)));
        assert!(shown.ends_with("...[truncated, 20000 bytes]"), "{shown}");
        assert!(shown.len() < PEER_TEXT_MAX + 40);
    }

    #[test]
    fn cuts_at_a_character_boundary_and_escapes_controls() {
        let t = PeerText::with_limit("é\nx", 1);
        assert_eq!(t.to_string(), "...[truncated, 4 bytes]");
        let t = PeerText::new("a\nfake=\"line\"");
        assert_eq!(t.to_string(), "a\\nfake=\"line\"");
        assert_eq!(format!("{t:?}"), "\"a\\nfake=\\\"line\\\"\"");
        let t = PeerText::from_bytes(&[b'x'; 1000]);
        assert!(t.to_string().ends_with("[truncated, 1000 bytes]"));
        assert_eq!(
            PeerText::display(&"0123456789", 4).to_string(),
            "0123...[truncated, 10 bytes]"
        );
        // Formatted in pieces, it keeps what the whole text cut once would keep.
        let pieces = format_args!("{}{}{}", "ab", "é", "cd");
        for max in 0..8 {
            assert_eq!(
                PeerText::display(&pieces, max),
                PeerText::with_limit("abécd", max),
                "{max}"
            );
        }
        // Quoted, the marker is inside the quotes: one token on a text line.
        assert_eq!(
            format!("{:?}", PeerText::with_limit("ab\"cdef", 3)),
            "\"ab\\\"...[truncated, 7 bytes]\""
        );
    }

    #[test]
    fn bounded_cuts_with_the_same_marker_without_escaping() {
        assert!(matches!(
            bounded("a\nb", 3),
            std::borrow::Cow::Borrowed("a\nb")
        ));
        assert_eq!(bounded("é\nxyz", 3), "é\n...[truncated, 6 bytes]");
        assert_eq!(bounded("éé", 3), "é...[truncated, 4 bytes]");
    }
}
