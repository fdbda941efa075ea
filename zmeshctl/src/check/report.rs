//! How `check` prints: a line per check (`✔`/`✘`, in colour on a terminal unless `NO_COLOR`
//! is set) with an indented hint under each failure, or one JSON document for scripts.

use std::io::IsTerminal;

use anstyle::{AnsiColor, Style};
use serde_json::json;

use super::Check;

/// Prints `checks` (as JSON with `json`); returns whether all passed.
pub fn print(checks: &[Check], json: bool) -> bool {
    let ok = checks.iter().all(|c| c.ok);
    if json {
        let doc = json!({"success": ok, "checks": checks});
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return ok;
    }
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let paint = |style: Style, text: &str| {
        if colour {
            format!("{style}{text}{style:#}")
        } else {
            text.to_owned()
        }
    };
    let green = AnsiColor::Green.on_default();
    let red = AnsiColor::Red.on_default().bold();
    let dim = Style::new().dimmed();
    for c in checks {
        let mark = if c.ok {
            paint(green, "✔")
        } else {
            paint(red, "✘")
        };
        println!("{mark} {}: {}", c.name, c.detail);
        if let Some(hint) = &c.hint {
            println!("    {}", paint(dim, &format!("hint: {hint}")));
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    if ok {
        println!("{}", paint(green, "all checks passed"));
    } else {
        println!(
            "{}",
            paint(red, &format!("{failed} of {} checks failed", checks.len()))
        );
    }
    ok
}
