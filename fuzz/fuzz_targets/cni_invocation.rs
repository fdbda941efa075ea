//! One CNI invocation as a container runtime makes it: the `CNI_*` environment and the
//! network configuration on stdin, through the plugin's parsers in the order the plugin runs
//! them (`zmesh_cni::plugin::run` minus the agent call and the log file).
//!
//! Input: `NAME=value` lines (the environment), an empty line, then stdin (any bytes). The
//! seeds in `corpus/cni_invocation/` are written that way.
//!
//! Invariants: every failure maps to a CNI error code of the spec and its error result is JSON
//! with that code; a pod in `CNI_ARGS` has a namespace and a name; an accepted `prevResult`
//! converts to every supported version, the conversion parses again, keeps the addresses,
//! and converting again changes nothing.
#![no_main]

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use zmesh_cni::spec::{
    CniEnv, CniError, CniVersion, Command, ErrorResult, NetConf, PrevResult, declared_version,
    parse_object,
};

/// Splits the input into the environment and stdin.
fn split(data: &[u8]) -> (Vec<(String, OsString)>, &[u8]) {
    let (env, stdin) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let vars = env
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let eq = line.iter().position(|b| *b == b'=')?;
            let name = String::from_utf8_lossy(&line[..eq]).into_owned();
            // Values are any bytes, as an environment can hold (the plugin must refuse
            // what is not UTF-8).
            let value = OsStr::from_bytes(&line[eq + 1..]).to_owned();
            Some((name, value))
        })
        .collect();
    (vars, stdin)
}

fn check_error(label: &str, e: &CniError) {
    let code = e.code();
    assert!(
        matches!(code, 1 | 4 | 5 | 6 | 7 | 11 | 50),
        "{e:?}: code {code} is not one of ours"
    );
    let out = serde_json::to_value(ErrorResult::new(label, e)).expect("error result serialises");
    assert_eq!(out["code"], Value::from(code));
    assert_eq!(out["cniVersion"], Value::from(label));
    assert!(!out["msg"].as_str().unwrap_or_default().is_empty(), "{e:?}");
}

fn check_prev_result(prev: PrevResult) {
    let addresses = prev.addresses();
    for v in CniVersion::ALL {
        let out = prev.to_version(v);
        assert_eq!(out["cniVersion"], Value::from(v.as_str()));
        let Value::Object(map) = out.clone() else {
            panic!("a result is an object")
        };
        let again = PrevResult::parse(map).expect("a converted result parses again");
        assert_eq!(
            again.addresses(),
            addresses,
            "conversion to {v} lost addresses"
        );
        assert_eq!(
            again.to_version(v),
            out,
            "conversion to {v} is not idempotent"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let (vars, stdin) = split(data);
    let lookup = |name: &str| {
        vars.iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let parsed = parse_object(stdin);
    let label = parsed
        .as_ref()
        .ok()
        .and_then(declared_version)
        .unwrap_or(CniVersion::LATEST.as_str())
        .to_owned();
    let command = match Command::from_env(&lookup) {
        Ok(c) => c,
        Err(e) => return check_error(&label, &e),
    };
    let env = match CniEnv::from_env(command, &lookup) {
        Ok(env) => env,
        Err(e) => return check_error(&label, &e),
    };
    if let Some(ifname) = &env.ifname {
        assert!(ifname.len() <= 15 && !ifname.contains('/'), "{ifname:?}");
    }
    if let Some(pod) = env.args.pod() {
        assert!(!pod.namespace.is_empty() && !pod.name.is_empty());
    }
    let map = match parsed {
        Ok(map) => map,
        Err(e) => return check_error(&label, &e),
    };
    let conf = match NetConf::from_object(&map) {
        Ok(conf) => conf,
        Err(e) => return check_error(&label, &e),
    };
    let version = match command.negotiate(conf.cni_version.as_deref()) {
        Ok(v) => v,
        Err(e) => return check_error(&label, &e),
    };
    assert_eq!(Some(version.as_str()), conf.cni_version.as_deref());
    if let Some(prev) = conf.prev_result {
        match PrevResult::parse(prev) {
            Ok(prev) => check_prev_result(prev),
            Err(e) => check_error(&label, &e),
        }
    }
});
