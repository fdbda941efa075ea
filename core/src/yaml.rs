//! Bounds on YAML input before it reaches the parser.
//!
//! The YAML parser (libyaml, under `serde_yaml`) spends time quadratic in the nesting depth of
//! a document (every flow level keeps a pending "simple key" that is re-checked on each
//! token): 100,000 nested `[` cost more than half a minute of CPU, on the thread that applies
//! the config. [`check_limits`] refuses such input first, in one linear pass: documents larger
//! than [`MAX_BYTES`] or nested deeper than [`MAX_DEPTH`] levels. Both ztunnel's local config
//! and the controller's YAML directory use it.
//!
//! The depth is counted from the text, as the parser nests nodes: each flow bracket (`[`, `{`)
//! outside quotes, comments and block scalars is a level, and each block level is a step of
//! indentation or a `- ` or `key: ` that opens a nested node on the same line. `serde_yaml`
//! itself refuses documents deeper than 128 levels (after parsing them whole), so the same
//! limit here refuses nothing it would accept.

/// The deepest nesting accepted: `serde_yaml`'s own recursion limit.
pub const MAX_DEPTH: usize = 128;
/// The largest document accepted (128 MiB, room for a few hundred thousand workloads).
pub const MAX_BYTES: usize = 128 << 20;

/// Why YAML input was refused before parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum YamlLimitError {
    #[error(
        "the document is {bytes} bytes; the limit is {limit} bytes: split it or remove what is not needed"
    )]
    TooLarge { bytes: usize, limit: usize },
    #[error(
        "the document is nested more than {limit} levels deep (at line {line}); the limit is {limit} levels: flatten it"
    )]
    TooDeep { limit: usize, line: usize },
}

/// Checks `text` against [`MAX_BYTES`] and [`MAX_DEPTH`].
pub fn check_limits(text: &str) -> Result<(), YamlLimitError> {
    check(text, MAX_BYTES, MAX_DEPTH)
}

/// Checks `text` against the given limits (see the module documentation for how depth is
/// counted).
pub fn check(text: &str, max_bytes: usize, max_depth: usize) -> Result<(), YamlLimitError> {
    if text.len() > max_bytes {
        return Err(YamlLimitError::TooLarge {
            bytes: text.len(),
            limit: max_bytes,
        });
    }
    let mut s = Scanner {
        max_depth,
        ..Scanner::default()
    };
    for (i, line) in text.lines().enumerate() {
        s.line(line, i + 1)?;
    }
    Ok(())
}

#[derive(Default)]
struct Scanner {
    max_depth: usize,
    /// Indentation columns of the open block levels.
    indents: Vec<usize>,
    /// Open flow brackets.
    flow: usize,
    /// Inside a quoted scalar that continues on the next line: its quote character.
    quote: Option<u8>,
    /// Inside a block scalar (`|` or `>`): lines indented more than this belong to it.
    block_scalar: Option<usize>,
}

impl Scanner {
    fn too_deep(&self, extra: usize, line: usize) -> Result<(), YamlLimitError> {
        if self.indents.len() + self.flow + extra > self.max_depth {
            return Err(YamlLimitError::TooDeep {
                limit: self.max_depth,
                line,
            });
        }
        Ok(())
    }

    fn line(&mut self, line: &str, no: usize) -> Result<(), YamlLimitError> {
        let b = line.as_bytes();
        let indent = b.iter().take_while(|c| **c == b' ').count();
        let blank = b[indent..].iter().all(|c| c.is_ascii_whitespace());
        if let Some(parent) = self.block_scalar {
            if blank || indent > parent {
                return Ok(());
            }
            self.block_scalar = None;
        }
        if blank {
            return Ok(());
        }
        let mut i = indent;
        if self.quote.is_none() && self.flow == 0 {
            if indent == 0
                && (b.starts_with(b"---") || b.starts_with(b"..."))
                && b.get(3).is_none_or(|c| c.is_ascii_whitespace())
            {
                // A new document (or its end) starts at the top again.
                self.indents.clear();
                return Ok(());
            }
            if b[i] == b'#' {
                return Ok(());
            }
            // A sequence may sit at its parent key's indentation: a line starting with `- `
            // counts as half a column deeper, so it nests under that key.
            let dash = b[i] == b'-' && b.get(i + 1).is_none_or(|c| *c == b' ');
            let level = 2 * indent + usize::from(dash);
            while self.indents.last().is_some_and(|&top| top >= level) {
                self.indents.pop();
            }
            self.indents.push(level);
            self.too_deep(0, no)?;
        }
        // Levels opened on this line after its first `- ` or `key: ` (that one is the line's
        // own level, counted by its indentation).
        let mut inline = 0;
        let mut first_indicator = true;
        // Block context: does the next token start a node (line start, after `- ` or `: `)?
        let mut expect_node = true;
        let mut after_space = true;
        let mut last_token = None;
        while i < b.len() {
            let c = b[i];
            if let Some(q) = self.quote {
                if c == b'\\' && q == b'"' {
                    i += 2;
                    continue;
                }
                if c == q {
                    if q == b'\'' && b.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    self.quote = None;
                }
                i += 1;
                continue;
            }
            if c == b' ' || c == b'\t' {
                after_space = true;
                i += 1;
                continue;
            }
            if c == b'#' && after_space {
                break;
            }
            let indicator_follows = b.get(i + 1).is_none_or(|n| *n == b' ' || *n == b'\t');
            let starts = if self.flow > 0 {
                flow_sep(b, i)
            } else {
                expect_node
            };
            match c {
                b'"' | b'\'' if starts => {
                    self.quote = Some(c);
                    last_token = Some(i);
                    expect_node = false;
                }
                b'[' | b'{' if starts || self.flow > 0 => {
                    self.flow += 1;
                    expect_node = false;
                    self.too_deep(inline, no)?;
                }
                b']' | b'}' if self.flow > 0 => self.flow -= 1,
                b'-' | b':'
                    if self.flow == 0 && indicator_follows && (c == b':' || expect_node) =>
                {
                    if !first_indicator {
                        inline += 1;
                    }
                    first_indicator = false;
                    expect_node = true;
                    self.too_deep(inline, no)?;
                }
                _ => {
                    if self.flow == 0 && expect_node {
                        last_token = Some(i);
                    }
                    expect_node = false;
                }
            }
            after_space = false;
            i += 1;
        }
        // `key: |` or `- >-`: the more indented lines that follow are text.
        if self.flow == 0
            && self.quote.is_none()
            && let Some(t) = last_token
            && matches!(b[t], b'|' | b'>')
            && b[t + 1..]
                .iter()
                .take_while(|c| !c.is_ascii_whitespace())
                .all(|c| matches!(c, b'-' | b'+' | b'0'..=b'9'))
        {
            self.block_scalar = Some(indent);
        }
        Ok(())
    }
}

/// Is the byte before `i` (spaces skipped) one after which a flow token starts?
fn flow_sep(b: &[u8], i: usize) -> bool {
    b[..i]
        .iter()
        .rev()
        .find(|c| **c != b' ')
        .is_none_or(|c| matches!(c, b'[' | b'{' | b',' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_ok(text: &str, max: usize) -> bool {
        check(text, usize::MAX, max).is_ok()
    }

    #[test]
    fn deep_flow_and_block_nesting_is_refused() {
        let flow = format!("a: {}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let err = check_limits(&flow).unwrap_err();
        assert_eq!(
            err,
            YamlLimitError::TooDeep {
                limit: MAX_DEPTH,
                line: 1
            }
        );
        assert!(err.to_string().contains("128 levels"), "{err}");
        let dashes = format!("{}x\n", "- ".repeat(100_000));
        assert!(matches!(
            check_limits(&dashes),
            Err(YamlLimitError::TooDeep { .. })
        ));
        let mut indented = String::new();
        for d in 0..200 {
            indented.push_str(&" ".repeat(d));
            indented.push_str("a:\n");
        }
        assert_eq!(
            check_limits(&indented),
            Err(YamlLimitError::TooDeep {
                limit: MAX_DEPTH,
                line: 129
            })
        );
    }

    #[test]
    fn ordinary_documents_pass_and_depth_is_not_underestimated() {
        let doc = "\
workloads:
- name: a   # a comment with [[[[ and {{{{
  namespace: default
  workloadIPs: [10.0.0.1]
  labels: {app: a, \"x[\": '{'}
  note: it's [not a flow
  script: |
    [[[[[[[[[[
    {{{{{{{{{{
  services:
    default/echo.default.svc.cluster.local:
      ports: {\"80\": 8080}
---
workloads: []
";
        // map / workloads' sequence / workload / services / the service / ports' `{`.
        assert!(depth_ok(doc, 6), "{:?}", check(doc, usize::MAX, 6));
        assert!(!depth_ok(doc, 5));
        // Each of these is three levels deep for the parser.
        for three in ["a: {b: [1]}", "- - [1]", "a:\n  b:\n    c: 1", "- a: [1]"] {
            assert!(depth_ok(three, 3), "{three}");
            assert!(!depth_ok(three, 2), "{three}");
        }
    }

    #[test]
    fn large_documents_are_refused_with_the_limit() {
        let err = check("0123456789", 4, MAX_DEPTH).unwrap_err();
        assert_eq!(
            err,
            YamlLimitError::TooLarge {
                bytes: 10,
                limit: 4
            }
        );
        assert!(err.to_string().contains("limit is 4 bytes"), "{err}");
    }
}
