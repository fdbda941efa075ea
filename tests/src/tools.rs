//! The programs the lab and the tests run, and the check that names each missing one with the
//! package that provides it (`zmesh-lab check`).
//!
//! The list is `scripts/tools.txt`, compiled in: the same file `scripts/setup` reads to install
//! the packages of the missing tools, so the check and the installer cannot disagree.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// `scripts/tools.txt` as checked in.
pub const TOOLS_TXT: &str = include_str!("../../scripts/tools.txt");

/// Where a tool is looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// On `PATH`.
    Path,
    /// In the CNI plugin directory (Debian's `/usr/lib/cni`).
    CniBin,
}

/// One program the lab runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tool {
    /// The program's file name (`nft`, `bridge`).
    pub name: String,
    /// The Debian/Ubuntu package that provides it.
    pub package: String,
    /// Where it is looked up.
    pub location: Location,
}

/// A line of `tools.txt` that is not `NAME PACKAGE [cni]`.
#[derive(Debug, thiserror::Error)]
#[error("tools.txt line {line}: {problem} (want `NAME PACKAGE` or `NAME PACKAGE cni`)")]
pub struct ToolsError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub problem: String,
}

/// Parses the `tools.txt` format: one tool a line, `#` comments and blank lines skipped.
pub fn parse(text: &str) -> Result<Vec<Tool>, ToolsError> {
    let mut tools = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let location = match fields.get(2..) {
            Some([]) => Location::Path,
            Some(["cni"]) => Location::CniBin,
            Some(rest) if !rest.is_empty() => {
                return Err(ToolsError {
                    line: line_no,
                    problem: format!("unexpected {:?}", rest.join(" ")),
                });
            }
            _ => {
                return Err(ToolsError {
                    line: line_no,
                    problem: format!("no package for {:?}", fields[0]),
                });
            }
        };
        tools.push(Tool {
            name: fields[0].to_owned(),
            package: fields[1].to_owned(),
            location,
        });
    }
    Ok(tools)
}

/// The tools of the checked-in `scripts/tools.txt` (a unit test keeps it parseable).
pub fn tools() -> Vec<Tool> {
    parse(TOOLS_TXT).expect("scripts/tools.txt parses (checked by a unit test)")
}

/// Where the check looks.
#[derive(Clone, Debug)]
pub struct Search {
    /// The directories of `PATH`, in order.
    pub path: Vec<PathBuf>,
    /// The CNI plugin directory.
    pub cni_bin: PathBuf,
}

impl Search {
    /// This process's `PATH`, and `cni_bin` for the CNI plugins.
    pub fn from_env(cni_bin: &Path) -> Search {
        let path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        Search {
            path,
            cni_bin: cni_bin.to_path_buf(),
        }
    }

    /// The executable file that provides `tool`, if there is one.
    pub fn find(&self, tool: &Tool) -> Option<PathBuf> {
        let dirs = match tool.location {
            Location::Path => self.path.as_slice(),
            Location::CniBin => std::slice::from_ref(&self.cni_bin),
        };
        dirs.iter()
            .map(|d| d.join(&tool.name))
            .find(|p| is_executable(p))
    }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What [`check`] found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Tools found, with where.
    pub found: Vec<(Tool, PathBuf)>,
    /// Tools not found.
    pub missing: Vec<Tool>,
}

/// Looks up every tool of `tools`.
pub fn check(tools: &[Tool], search: &Search) -> Report {
    let mut report = Report::default();
    for tool in tools {
        match search.find(tool) {
            Some(path) => report.found.push((tool.clone(), path)),
            None => report.missing.push(tool.clone()),
        }
    }
    report
}

impl Report {
    /// The packages of the missing tools, sorted, each once.
    pub fn missing_packages(&self) -> Vec<&str> {
        let mut packages: Vec<&str> = self.missing.iter().map(|t| t.package.as_str()).collect();
        packages.sort_unstable();
        packages.dedup();
        packages
    }

    /// One line per tool (`ok` with its path, or `MISSING` with its package and where it was
    /// looked for), then what to install if anything is missing.
    pub fn render(&self, search: &Search) -> String {
        let mut out = String::new();
        for (tool, path) in &self.found {
            out.push_str(&format!("ok       {:<25} {}\n", tool.name, path.display()));
        }
        for tool in &self.missing {
            let place = match tool.location {
                Location::Path => "on PATH".to_owned(),
                Location::CniBin => format!("in {}", search.cni_bin.display()),
            };
            out.push_str(&format!(
                "MISSING  {:<25} not found {place}: install the package {}\n",
                tool.name, tool.package
            ));
        }
        if !self.missing.is_empty() {
            out.push_str(&format!(
                "{} tool(s) missing: run scripts/setup, or apt-get install {}\n",
                self.missing.len(),
                self.missing_packages().join(" ")
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_list_parses_and_has_the_cni_plugins() {
        let tools = tools();
        let bridge = tools.iter().find(|t| t.name == "bridge").unwrap();
        assert_eq!(bridge.package, "containernetworking-plugins");
        assert_eq!(bridge.location, Location::CniBin);
        let nft = tools.iter().find(|t| t.name == "nft").unwrap();
        assert_eq!(
            (nft.package.as_str(), nft.location),
            ("nftables", Location::Path)
        );
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        let e = parse("# c\n\nip iproute2\nnft\n").unwrap_err();
        assert_eq!(e.line, 4);
        assert!(e.to_string().contains("no package for \"nft\""), "{e}");
        let e = parse("bridge containernetworking-plugins cni extra\n").unwrap_err();
        assert!(e.to_string().contains("unexpected \"cni extra\""), "{e}");
    }

    #[test]
    fn a_missing_tool_is_named_with_its_package() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let cni = dir.path().join("cni");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&cni).unwrap();
        let exe = |p: PathBuf| {
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        exe(bin.join("ip"));
        exe(cni.join("bridge"));
        // Present but not executable: missing.
        std::fs::write(bin.join("nft"), "").unwrap();
        let tools = parse(
            "ip iproute2\nnft nftables\nbridge containernetworking-plugins cni\n\
             host-local containernetworking-plugins cni\n",
        )
        .unwrap();
        let search = Search {
            path: vec![dir.path().join("nowhere"), bin.clone()],
            cni_bin: cni.clone(),
        };
        let report = check(&tools, &search);
        let found: Vec<&str> = report.found.iter().map(|(t, _)| t.name.as_str()).collect();
        assert_eq!(found, ["ip", "bridge"]);
        assert_eq!(report.found[0].1, bin.join("ip"));
        assert_eq!(
            report.missing_packages(),
            ["containernetworking-plugins", "nftables"]
        );
        let text = report.render(&search);
        assert!(
            text.contains("MISSING  nft                       not found on PATH: install the package nftables\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "MISSING  host-local                not found in {}: install the package \
                 containernetworking-plugins\n",
                cni.display()
            )),
            "{text}"
        );
        assert!(
            text.ends_with(
                "2 tool(s) missing: run scripts/setup, or apt-get install \
                 containernetworking-plugins nftables\n"
            ),
            "{text}"
        );
        assert!(!text.contains("MISSING  ip "), "{text}");
    }
}
