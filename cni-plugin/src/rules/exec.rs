//! Running the rule tools (`nft`, `iptables-*-restore`, `ip`) inside a network namespace.
//!
//! A process's network namespace is per thread: [`in_netns`] runs its closure on a dedicated
//! thread that `setns()`es into the target first, and every program that closure starts
//! inherits that thread's namespace. The caller's threads never change namespace. A [`Step`]
//! is one program run with its stdin; [`transcript`] shows steps as a shell script, which is
//! what [`super::render`] returns.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use super::RulesError;

/// One run of a program: arguments, optional stdin, and the stderr texts that mean "already
/// so" (e.g. `File exists` when adding a policy rule that is there), which count as success.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// The program, looked up in `PATH`.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// What it reads on stdin (`None`: nothing, stdin is `/dev/null`).
    pub stdin: Option<String>,
    /// Substrings of stderr that make a failure count as success.
    pub tolerate: &'static [&'static str],
}

impl Step {
    /// A step without stdin that must succeed.
    pub fn new<I, S>(program: &str, args: I) -> Step
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Step {
            program: program.to_owned(),
            args: args.into_iter().map(Into::into).collect(),
            stdin: None,
            tolerate: &[],
        }
    }

    /// The same step, fed `input` on stdin.
    pub fn stdin(mut self, input: String) -> Step {
        self.stdin = Some(input);
        self
    }

    /// The same step, where a failure whose stderr contains one of `texts` counts as success.
    pub fn tolerate(mut self, texts: &'static [&'static str]) -> Step {
        self.tolerate = texts;
        self
    }

    /// The command line, for errors and logs.
    pub fn command_line(&self) -> String {
        let mut s = self.program.clone();
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    /// Runs the step in the calling thread's network namespace and returns its stdout.
    /// Messages are forced to English (`LC_ALL=C`) so that [`Step::tolerate`] can match them.
    pub fn run(&self) -> Result<String, RulesError> {
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .env("LC_ALL", "C")
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| RulesError::Spawn {
                command: self.command_line(),
                source,
            })?;
        // Feed stdin from another thread so that a chatty program cannot deadlock us.
        let output = std::thread::scope(|s| {
            if let (Some(input), Some(mut pipe)) = (&self.stdin, child.stdin.take()) {
                s.spawn(move || {
                    // A program that exits early closes the pipe; its status tells why.
                    let _ = pipe.write_all(input.as_bytes());
                });
            }
            child.wait_with_output()
        })
        .map_err(|source| RulesError::Spawn {
            command: self.command_line(),
            source,
        })?;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if output.status.success() || self.tolerate.iter().any(|t| stderr.contains(t)) {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        Err(RulesError::Failed {
            command: self.command_line(),
            status: output.status.to_string(),
            stderr,
        })
    }
}

/// Runs every step in order, stopping at the first failure.
pub fn run_all(steps: &[Step]) -> Result<(), RulesError> {
    steps.iter().try_for_each(|s| s.run().map(drop))
}

/// Runs `f` inside the network namespace at `netns` (a `/proc/<pid>/ns/net` or
/// `/run/netns/<name>` file) on a dedicated thread, or, for `None`, on the calling thread in
/// its current namespace. A panic in `f` propagates.
pub fn in_netns<T, F>(netns: Option<&Path>, f: F) -> Result<T, RulesError>
where
    T: Send,
    F: FnOnce() -> Result<T, RulesError> + Send,
{
    let Some(path) = netns else {
        return f();
    };
    let file = File::open(path).map_err(|source| RulesError::OpenNetns {
        path: path.to_owned(),
        source,
    })?;
    std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("zmesh-rules-netns".to_owned())
            .spawn_scoped(s, move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                    |source| RulesError::EnterNetns {
                        path: path.to_owned(),
                        source,
                    },
                )?;
                drop(file);
                f()
            })
            .map_err(RulesError::Thread)?;
        match worker.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Shows steps as a shell script: one command per line, stdin as a quoted here-document,
/// tolerated failures as a trailing comment.
pub fn transcript(header: &[String], steps: &[Step]) -> String {
    let mut out = String::new();
    for line in header {
        let _ = writeln!(out, "# {line}");
    }
    for step in steps {
        out.push_str(&step.command_line());
        if step.stdin.is_some() {
            out.push_str(" <<'EOF'");
        }
        if !step.tolerate.is_empty() {
            let texts: Vec<String> = step.tolerate.iter().map(|t| format!("{t:?}")).collect();
            let _ = write!(out, "  # ok if: {}", texts.join(", "));
        }
        out.push('\n');
        if let Some(input) = &step.stdin {
            out.push_str(input);
            if !input.ends_with('\n') {
                out.push('\n');
            }
            out.push_str("EOF\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcript_shows_stdin_and_tolerance() {
        let steps = [
            Step::new("ip", ["rule", "add"]).tolerate(&["File exists"]),
            Step::new("nft", ["-f", "-"]).stdin("flush ruleset".to_owned()),
        ];
        assert_eq!(
            transcript(&["hello".to_owned()], &steps),
            "# hello\nip rule add  # ok if: \"File exists\"\nnft -f - <<'EOF'\nflush ruleset\nEOF\n"
        );
    }

    #[test]
    fn failures_carry_the_command_and_its_stderr() {
        let err = Step::new("sh", ["-c", "echo oops >&2; exit 3"])
            .run()
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("sh -c echo oops"), "{text}");
        assert!(text.contains("oops"), "{text}");
        assert!(text.contains('3'), "{text}");
    }

    #[test]
    fn tolerated_failures_succeed_and_stdin_is_fed() {
        Step::new("sh", ["-c", "echo 'File exists' >&2; exit 2"])
            .tolerate(&["File exists"])
            .run()
            .unwrap();
        let out = Step::new("cat", Vec::<String>::new())
            .stdin("abc".to_owned())
            .run()
            .unwrap();
        assert_eq!(out, "abc");
    }

    #[test]
    fn missing_programs_are_reported() {
        let err = Step::new("zmesh-no-such-program", ["x"]).run().unwrap_err();
        assert!(matches!(err, RulesError::Spawn { .. }), "{err}");
    }

    #[test]
    fn unopenable_netns_is_reported() {
        let err = in_netns(Some(Path::new("/nonexistent/netns")), || Ok(())).unwrap_err();
        assert!(matches!(err, RulesError::OpenNetns { .. }), "{err}");
    }
}
