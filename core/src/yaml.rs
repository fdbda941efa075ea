//! Bounds on YAML input before it reaches the parser.
//!
//! The YAML parser (libyaml, under `serde_yaml`) spends time quadratic in the nesting depth of
//! a document (every open flow level keeps a pending "simple key" that is re-checked on each
//! token), and `serde_yaml` collects a whole document's events before it looks at their depth:
//! 100,000 nested `[` cost more than half a minute of CPU, on the thread that applies the
//! config. [`check_limits`] refuses such input first: documents larger than [`MAX_BYTES`], or
//! nested deeper than [`MAX_DEPTH`] levels. Both ztunnel's local config and the controller's
//! YAML directory use it.
//!
//! The depth is the parser's own: the check pulls libyaml's events one at a time (the same
//! parser `serde_yaml` runs, so tags, anchors, quotes, comments and block scalars are read
//! exactly as the real parse reads them) and stops at the first collection that opens past the
//! limit. Up to that point every open level is within the limit, so the check costs time linear
//! in the input. `serde_yaml` itself refuses documents deeper than 128 levels (after parsing
//! them whole), so the same limit here refuses nothing it would accept. A document libyaml
//! cannot parse passes the check; the parse that follows reports the error.

use std::marker::PhantomData;
use std::mem::MaybeUninit;

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
    let mut events = Events::new(text);
    let mut depth = 0usize;
    while let Some((event, line)) = events.next() {
        match event {
            Event::Open => {
                depth += 1;
                if depth > max_depth {
                    return Err(YamlLimitError::TooDeep {
                        limit: max_depth,
                        line,
                    });
                }
            }
            Event::Close => depth = depth.saturating_sub(1),
            Event::Other => {}
        }
    }
    Ok(())
}

/// What the depth check needs of a libyaml event.
enum Event {
    /// A sequence or mapping starts.
    Open,
    /// A sequence or mapping ends.
    Close,
    Other,
}

/// libyaml's event stream over a borrowed text.
struct Events<'a> {
    /// Boxed: libyaml's parser is large, and it stays at one address while it runs.
    parser: Box<MaybeUninit<unsafe_libyaml::yaml_parser_t>>,
    /// Whether `parser` was initialised (and so must be deleted).
    live: bool,
    _text: PhantomData<&'a str>,
}

impl<'a> Events<'a> {
    fn new(text: &'a str) -> Self {
        let mut parser = Box::new(MaybeUninit::<unsafe_libyaml::yaml_parser_t>::uninit());
        let p = parser.as_mut_ptr();
        // SAFETY: `yaml_parser_initialize` initialises the struct `p` points to (it fails only
        // when it cannot allocate its buffers, and then leaves nothing to free). The input is
        // `text`, borrowed for the life of `Events`, read through the pointer and length given.
        let live = unsafe {
            if unsafe_libyaml::yaml_parser_initialize(p).fail {
                false
            } else {
                unsafe_libyaml::yaml_parser_set_encoding(p, unsafe_libyaml::YAML_UTF8_ENCODING);
                unsafe_libyaml::yaml_parser_set_input_string(p, text.as_ptr(), text.len() as u64);
                true
            }
        };
        Events {
            parser,
            live,
            _text: PhantomData,
        }
    }

    /// The next event and the line (1-based) it starts on; `None` at the end of the stream or
    /// at the first parse error.
    fn next(&mut self) -> Option<(Event, usize)> {
        if !self.live {
            return None;
        }
        let p = self.parser.as_mut_ptr();
        let mut event = MaybeUninit::<unsafe_libyaml::yaml_event_t>::uninit();
        // SAFETY: `p` is an initialised parser (`live`). `yaml_parser_parse` fills `event` when
        // it succeeds; only then is the event read and, once read, deleted. After an error the
        // parser is not used again (`live` is cleared).
        unsafe {
            if unsafe_libyaml::yaml_parser_parse(p, event.as_mut_ptr()).fail {
                self.stop();
                return None;
            }
            let e = event.as_mut_ptr();
            let kind = (*e).type_;
            let line = (*e).start_mark.line as usize + 1;
            unsafe_libyaml::yaml_event_delete(e);
            let event = match kind {
                unsafe_libyaml::YAML_SEQUENCE_START_EVENT
                | unsafe_libyaml::YAML_MAPPING_START_EVENT => Event::Open,
                unsafe_libyaml::YAML_SEQUENCE_END_EVENT
                | unsafe_libyaml::YAML_MAPPING_END_EVENT => Event::Close,
                // libyaml never succeeds without an event; were it to, stop rather than loop.
                unsafe_libyaml::YAML_STREAM_END_EVENT | unsafe_libyaml::YAML_NO_EVENT => {
                    self.stop();
                    return None;
                }
                _ => Event::Other,
            };
            Some((event, line))
        }
    }

    fn stop(&mut self) {
        if self.live {
            self.live = false;
            // SAFETY: the parser was initialised and is deleted once (`live` is now false).
            unsafe { unsafe_libyaml::yaml_parser_delete(self.parser.as_mut_ptr()) }
        }
    }
}

impl Drop for Events<'_> {
    fn drop(&mut self) {
        self.stop();
    }
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
    fn depth_is_counted_through_tags_anchors_and_explicit_keys() {
        // A tag, an anchor or an explicit key `? ` before a quoted scalar, in flow: the quote's
        // brackets are text, and what follows the scalar is still counted. (A check that
        // missed the quote after `!Prefix ` took a later quote for an opening one and skipped
        // 65,000 levels: fuzz/regressions/local_config/tag-before-quote.)
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        for prefix in [
            "{!Prefix \"a: [\\\"x\\\"]\": ",
            "{&anchor \"]]]]\": ",
            "{? \"]]]]\": ",
            "{!!str \"\\\"]]\": ",
        ] {
            let doc = format!("{prefix}{deep}}}");
            assert!(
                matches!(check_limits(&doc), Err(YamlLimitError::TooDeep { .. })),
                "{doc:.60}"
            );
            let shallow = format!("{prefix}[[1]]}}");
            assert!(depth_ok(&shallow, 3), "{shallow}");
            assert!(!depth_ok(&shallow, 2), "{shallow}");
        }
    }

    #[test]
    fn a_million_levels_are_refused() {
        // The check stops at the first level past the limit, so a million levels cost no more
        // than the first 129 (libyaml's look-ahead is bounded by its 1024-character simple
        // keys); parsing all of them would take hours.
        let doc = format!("a: {}", "[".repeat(1_000_000));
        assert_eq!(
            check_limits(&doc),
            Err(YamlLimitError::TooDeep {
                limit: MAX_DEPTH,
                line: 1
            })
        );
    }

    #[test]
    fn unparsable_input_is_left_to_the_parser() {
        // The check refuses only what is too large or too deep; a syntax error is reported by
        // the parse that follows, with its position.
        assert!(check_limits("a: [1, 2\nb: }").is_ok());
        assert!(serde_yaml::from_str::<serde_yaml::Value>("a: [1, 2\nb: }").is_err());
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
