//! The CNI installer against realistic primary configs in temp dirs (no root needed):
//! discovery as runtimes do it, chain/unchain/wrap, idempotence, atomic binary install, and a
//! property test over arbitrary file contents.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use proptest::prelude::*;
use serde_json::{Value, json};
use zmesh_cni::install::json::Json;
use zmesh_cni::install::{
    ChainChange, InstallError, PLUGIN_TYPE, PrimaryKind, chain, find_primary, install_binary,
    is_chained, scan, unchain,
};

/// containerd's example network: bridge + host-local + portmap, CNI 1.0.0, in the layout we
/// write (two-space indent), so the chained file can be compared as text.
const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "containerd-net",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "promiscMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [
          [
            {
              "subnet": "10.88.0.0/16"
            }
          ]
        ],
        "routes": [
          {
            "dst": "0.0.0.0/0"
          }
        ]
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
"#;

/// The same with our entry appended: the golden output of `chain`.
const BRIDGE_CHAINED_TAIL: &str = r#"    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    },
    {
      "type": "zmesh-cni",
      "agent_socket": "/var/run/zmesh/agent.sock",
      "exclude_namespaces": [
        "kube-system",
        "istio-system"
      ],
      "log_file": "/var/log/zmesh-cni.log",
      "log_level": "info"
    }
  ]
}
"#;

/// Calico-like: compact, keys deliberately unsorted, nested unknown keys, a null, a float.
const CALICO: &str = r#"{"name":"k8s-pod-network","cniVersion":"0.3.1","plugins":[{"type":"calico","log_level":"info","log_file_path":"/var/log/calico/cni/cni.log","datastore_type":"kubernetes","nodename":"node-1","mtu":0,"ipam":{"type":"calico-ipam","assign_ipv4":"true"},"policy":{"type":"k8s"},"kubernetes":{"kubeconfig":"/etc/cni/net.d/calico-kubeconfig","k8s_api_root":null},"container_settings":{"allow_ip_forwarding":false}},{"type":"portmap","snat":true,"capabilities":{"portMappings":true}},{"type":"bandwidth","capabilities":{"bandwidth":true}}],"x-vendor":{"zeta":1,"alpha":[1,2.5,{"b":null,"a":"x"}]}}"#;

/// An old flannel single-plugin config.
const FLANNEL_CONF: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "type": "flannel",
  "delegate": { "hairpinMode": true, "isDefaultGateway": true }
}"#;

fn entry() -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "cniVersion": "1.0.0",
        "agent_socket": "/var/run/zmesh/agent.sock",
        "log_file": "/var/log/zmesh-cni.log",
        "log_level": "info",
        "exclude_namespaces": ["kube-system", "istio-system"],
    })
}

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn ours_count(doc: &Value) -> usize {
    doc["plugins"]
        .as_array()
        .map(|p| p.iter().filter(|p| p["type"] == PLUGIN_TYPE).count())
        .unwrap_or(0)
}

fn entry_without_version() -> Value {
    let mut e = entry();
    e.as_object_mut().unwrap().remove("cniVersion");
    e
}

/// Top-level and per-plugin key order, as written in the file.
fn key_order(bytes: &[u8]) -> Vec<Vec<String>> {
    let Json::Object(doc) = Json::from_slice(bytes).unwrap() else {
        panic!("not an object")
    };
    let mut orders = vec![doc.iter().map(|(k, _)| k.to_owned()).collect()];
    if let Some(Json::Array(plugins)) = doc.get("plugins") {
        for p in plugins {
            let keys = p.as_object().unwrap().iter().map(|(k, _)| k.to_owned());
            orders.push(keys.collect());
        }
    }
    orders
}

#[test]
fn chains_bridge_golden_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-containerd-net.conflist", BRIDGE);
    let path = dir.path().join("10-containerd-net.conflist");
    assert!(!is_chained(dir.path()));

    let change = chain(dir.path(), entry()).unwrap();
    assert_eq!(
        change,
        ChainChange::Appended {
            path: path.clone(),
            replaced: 0
        }
    );
    let text = fs::read_to_string(&path).unwrap();
    let head = BRIDGE
        .split_at(BRIDGE.find("    {\n      \"type\": \"portmap\"").unwrap())
        .0;
    assert_eq!(text, format!("{head}{BRIDGE_CHAINED_TAIL}"));
    assert!(is_chained(dir.path()));

    assert_eq!(
        chain(dir.path(), entry()).unwrap(),
        ChainChange::Unchanged { path: path.clone() }
    );
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        text,
        "chain twice == once"
    );

    assert_eq!(unchain(dir.path()).unwrap(), vec![path.clone()]);
    assert_eq!(fs::read_to_string(&path).unwrap(), BRIDGE);
    assert!(!is_chained(dir.path()));
    assert!(unchain(dir.path()).unwrap().is_empty());
}

#[test]
fn chains_calico_keeping_unknown_keys_and_their_order() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-calico.conflist", CALICO);
    let path = dir.path().join("10-calico.conflist");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    let original: Value = serde_json::from_str(CALICO).unwrap();

    chain(dir.path(), entry()).unwrap();
    let chained = read_json(&path);
    let plugins = chained["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 4);
    assert_eq!(plugins[..3], original["plugins"].as_array().unwrap()[..]);
    assert_eq!(plugins[3], entry_without_version());
    assert_eq!(chained["x-vendor"], original["x-vendor"]);
    assert_eq!(chained["name"], "k8s-pod-network");
    let mut expected_order = key_order(CALICO.as_bytes());
    expected_order.push(
        [
            "type",
            "agent_socket",
            "exclude_namespaces",
            "log_file",
            "log_level",
        ]
        .map(String::from)
        .to_vec(),
    );
    assert_eq!(key_order(&fs::read(&path).unwrap()), expected_order);
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);

    unchain(dir.path()).unwrap();
    assert_eq!(read_json(&path), original);
    assert_eq!(
        key_order(&fs::read(&path).unwrap()),
        key_order(CALICO.as_bytes())
    );
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);

    // A stale entry (older settings, not last) is replaced, not duplicated.
    let mut stale = chained.clone();
    let list = stale["plugins"].as_array_mut().unwrap();
    let ours = list.pop().unwrap();
    list.insert(1, json!({"type": PLUGIN_TYPE, "log_level": "debug"}));
    list.insert(0, ours);
    fs::write(&path, serde_json::to_vec(&stale).unwrap()).unwrap();
    let change = chain(dir.path(), entry()).unwrap();
    assert!(matches!(change, ChainChange::Appended { replaced: 2, .. }));
    assert_eq!(read_json(&path), chained);
}

#[test]
fn wraps_a_bare_conf_into_a_conflist() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-flannel.conf", FLANNEL_CONF);
    let from = dir.path().join("10-flannel.conf");
    fs::set_permissions(&from, fs::Permissions::from_mode(0o600)).unwrap();
    let primary = find_primary(dir.path()).unwrap().unwrap();
    assert_eq!(primary.kind, PrimaryKind::Single);

    let to = dir.path().join("10-flannel.conflist");
    let change = chain(dir.path(), entry()).unwrap();
    assert_eq!(
        change,
        ChainChange::Wrapped {
            from: from.clone(),
            to: to.clone()
        }
    );
    assert!(!from.exists());
    let original: Value = serde_json::from_str(FLANNEL_CONF).unwrap();
    let expected = json!({
        "cniVersion": "0.3.1",
        "name": "cbr0",
        "plugins": [original.clone(), entry_without_version()],
    });
    assert_eq!(read_json(&to), expected);
    assert_eq!(
        key_order(&fs::read(&to).unwrap())[0],
        ["cniVersion", "name", "plugins"]
    );
    assert_eq!(fs::metadata(&to).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(find_primary(dir.path()).unwrap().unwrap().path, to);
    assert!(is_chained(dir.path()));

    let bytes = fs::read(&to).unwrap();
    assert_eq!(
        chain(dir.path(), entry()).unwrap(),
        ChainChange::Unchanged { path: to.clone() }
    );
    assert_eq!(fs::read(&to).unwrap(), bytes);

    // Uninstall keeps the conflist, with just the original plugin.
    assert_eq!(unchain(dir.path()).unwrap(), vec![to.clone()]);
    assert_eq!(read_json(&to)["plugins"], json!([original]));
}

#[test]
fn wraps_json_and_defaults_missing_name_and_version() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "50-net.json",
        r#"{"type":"ptp","ipam":{"type":"dhcp"}}"#,
    );
    write(dir.path(), "60-other.conflist", BRIDGE);
    let change = chain(dir.path(), entry()).unwrap();
    let to = dir.path().join("50-net.conflist");
    assert!(matches!(&change, ChainChange::Wrapped { to: t, .. } if *t == to));
    let doc = read_json(&to);
    assert_eq!(doc["cniVersion"], "0.3.1");
    assert_eq!(doc["name"], "k8s-pod-network");
    assert_eq!(ours_count(&doc), 1);
    assert_eq!(
        fs::read_to_string(dir.path().join("60-other.conflist")).unwrap(),
        BRIDGE
    );
}

#[test]
fn refuses_to_wrap_when_it_would_change_what_runtimes_load() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-flannel.conf", FLANNEL_CONF);
    write(dir.path(), "10-flannel.conf.d.conf", FLANNEL_CONF);
    let err = chain(dir.path(), entry()).unwrap_err();
    assert!(matches!(err, InstallError::CannotWrap { .. }), "{err}");
    assert!(err.to_string().contains("10-flannel.conf.d.conf"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-flannel.conf", FLANNEL_CONF);
    write(dir.path(), "10-flannel.conflist", "not json");
    let err = chain(dir.path(), entry()).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(
        fs::read_to_string(dir.path().join("10-flannel.conf")).unwrap(),
        FLANNEL_CONF
    );
}

#[test]
fn selects_the_first_valid_file_in_byte_order() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "00-broken.conflist", "{\"plugins\": [");
    write(
        dir.path(),
        "01-empty.conflist",
        r#"{"name":"x","plugins":[]}"#,
    );
    write(dir.path(), "02-notype.conf", r#"{"name":"x"}"#);
    write(dir.path(), "03-list.conflist", r#"{"plugins":[1]}"#);
    write(dir.path(), "04-notes.txt", BRIDGE);
    fs::create_dir(dir.path().join("05-dir.conflist")).unwrap();
    write(dir.path(), "20-calico.conflist", CALICO);
    write(dir.path(), "30-bridge.conflist", BRIDGE);
    write(dir.path(), "Z-upper.conflist", BRIDGE);

    let scanned = scan(dir.path()).unwrap();
    let names: Vec<_> = scanned
        .valid
        .iter()
        .map(|p| p.path.file_name().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "20-calico.conflist",
            "30-bridge.conflist",
            "Z-upper.conflist"
        ]
    );
    let messages: Vec<String> = scanned.skipped.iter().map(ToString::to_string).collect();
    assert_eq!(messages.len(), 4, "{messages:?}");
    assert!(
        messages[0].contains("00-broken.conflist is not valid JSON"),
        "{}",
        messages[0]
    );
    assert!(
        messages.iter().all(|m| m.ends_with("fix or remove it")),
        "{messages:?}"
    );
    assert!(messages[1].contains("`plugins` is empty"));
    assert!(messages[2].contains("no `type`"));
    assert!(messages[3].contains("plugins[0] is a number"));

    chain(dir.path(), entry()).unwrap();
    assert_eq!(
        ours_count(&read_json(&dir.path().join("20-calico.conflist"))),
        1
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("30-bridge.conflist")).unwrap(),
        BRIDGE
    );
}

#[test]
fn no_primary_yet_names_the_skipped_files() {
    let dir = tempfile::tempdir().unwrap();
    assert!(find_primary(dir.path()).unwrap().is_none());
    write(dir.path(), "10-flannel.conflist", "{oops");
    assert!(find_primary(dir.path()).unwrap().is_none());
    let err = chain(dir.path(), entry()).unwrap_err();
    assert!(matches!(err, InstallError::NoPrimary { .. }));
    let message = err.to_string();
    assert!(
        message.contains("10-flannel.conflist is not valid JSON"),
        "{message}"
    );
    assert!(!is_chained(dir.path()));

    let missing = dir.path().join("nope");
    assert!(matches!(
        find_primary(&missing),
        Err(InstallError::Read { .. })
    ));
}

#[test]
fn follows_a_new_primary_that_sorts_first() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "20-bridge.conflist", BRIDGE);
    chain(dir.path(), entry()).unwrap();
    assert!(is_chained(dir.path()));
    write(dir.path(), "10-calico.conflist", CALICO);
    assert!(
        !is_chained(dir.path()),
        "our entry is only in a file runtimes no longer load"
    );
    chain(dir.path(), entry()).unwrap();
    assert!(is_chained(dir.path()));
    // Uninstall cleans both files.
    let mut changed = unchain(dir.path()).unwrap();
    changed.sort();
    assert_eq!(changed.len(), 2);
    assert_eq!(
        fs::read_to_string(dir.path().join("20-bridge.conflist")).unwrap(),
        BRIDGE
    );
}

#[test]
fn a_single_plugin_file_is_never_chained_even_with_a_plugins_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"{"type":"ptp","plugins":[{"type":"zmesh-cni"}]}"#;
    write(dir.path(), "10-odd.conf", text);
    assert!(
        !is_chained(dir.path()),
        "runtimes ignore `plugins` in a .conf"
    );
    assert!(unchain(dir.path()).unwrap().is_empty());
    assert_eq!(
        fs::read_to_string(dir.path().join("10-odd.conf")).unwrap(),
        text
    );
    chain(dir.path(), entry()).unwrap();
    let doc = read_json(&dir.path().join("10-odd.conflist"));
    assert_eq!(
        doc["plugins"][0],
        serde_json::from_str::<Value>(text).unwrap()
    );
    assert_eq!(ours_count(&doc), 1);
}

#[test]
fn rejects_an_entry_that_is_not_ours() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10.conflist", BRIDGE);
    for bad in [
        json!({"type": "bridge"}),
        json!({}),
        json!([1]),
        json!({"type": 3}),
    ] {
        let err = chain(dir.path(), bad).unwrap_err();
        assert!(matches!(err, InstallError::BadEntry(_)), "{err}");
    }
    assert_eq!(
        fs::read_to_string(dir.path().join("10.conflist")).unwrap(),
        BRIDGE
    );
}

#[test]
fn installs_the_binary_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let (src, bin) = (dir.path().join("build"), dir.path().join("bin"));
    fs::create_dir(&bin).unwrap();
    fs::write(&src, b"\x7fELF version 1").unwrap();
    let dest = bin.join("zmesh-cni");

    assert!(install_binary(&src, &bin).unwrap());
    assert_eq!(fs::read(&dest).unwrap(), b"\x7fELF version 1");
    assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o7777, 0o755);
    let first_inode = fs::metadata(&dest).unwrap().ino();

    // Same content: nothing written, but a wrong mode is fixed.
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o700)).unwrap();
    assert!(!install_binary(&src, &bin).unwrap());
    assert_eq!(fs::metadata(&dest).unwrap().ino(), first_inode);
    assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o7777, 0o755);

    // New content replaces the file by rename: a reader of the old one keeps the old bytes.
    let old = fs::File::open(&dest).unwrap();
    fs::write(&src, b"\x7fELF version 2, longer").unwrap();
    assert!(install_binary(&src, &bin).unwrap());
    assert_eq!(fs::read(&dest).unwrap(), b"\x7fELF version 2, longer");
    assert_ne!(fs::metadata(&dest).unwrap().ino(), first_inode);
    assert_eq!(old.metadata().unwrap().len(), 14);
    let names: Vec<_> = fs::read_dir(&bin)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["zmesh-cni"], "no temp files left");

    let err = install_binary(&dir.path().join("missing"), &bin).unwrap_err();
    assert!(matches!(err, InstallError::Read { .. }));
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop_oneof![
            Just("zmesh-cni".to_owned()),
            Just("bridge".to_owned()),
            ".{0,8}"
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let key = prop_oneof![
            Just("type".to_owned()),
            Just("plugins".to_owned()),
            Just("name".to_owned()),
            Just("cniVersion".to_owned()),
            "[a-z]{1,6}"
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
            prop::collection::btree_map(key, inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Mostly-valid configs: a `plugins` list of arbitrary objects (some already ours) plus
/// arbitrary extra keys (and maybe a `type`), so the property exercises the success path, not only rejections.
fn arb_config() -> impl Strategy<Value = Value> {
    let plugin = (
        prop_oneof![Just(json!("zmesh-cni")), Just(json!("calico")), arb_json()],
        prop::collection::btree_map("[a-z]{1,6}", arb_json(), 0..4),
    )
        .prop_map(|(kind, extra)| {
            let mut object: serde_json::Map<String, Value> = extra.into_iter().collect();
            object.insert("type".to_owned(), kind);
            Value::Object(object)
        });
    (
        prop::collection::vec(plugin, 0..4),
        prop_oneof![
            Just(None),
            Just(Some(json!("calico"))),
            arb_json().prop_map(Some)
        ],
        prop::collection::btree_map("[a-z]{1,6}", arb_json(), 0..4),
    )
        .prop_map(|(plugins, kind, extra)| {
            let mut object: serde_json::Map<String, Value> = extra.into_iter().collect();
            object.insert("plugins".to_owned(), Value::from(plugins));
            // With a `type`, a `.conf`/`.json` is a valid single-plugin config to wrap.
            if let Some(kind) = kind {
                object.insert("type".to_owned(), kind);
            }
            Value::Object(object)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn chain_never_panics_and_leaves_exactly_one_entry(
        content in prop_oneof![1 => arb_json(), 3 => arb_config()],
        ext in prop_oneof![Just("conflist"), Just("conf"), Just("json")],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("10-arb.{ext}");
        fs::write(dir.path().join(&name), serde_json::to_vec(&content).unwrap()).unwrap();
        if let Ok(change) = chain(dir.path(), entry()) {
            let path = match change {
                ChainChange::Unchanged { path } | ChainChange::Appended { path, .. } => path,
                ChainChange::Wrapped { to, .. } => to,
            };
            let doc = read_json(&path);
            prop_assert_eq!(ours_count(&doc), 1);
            prop_assert!(is_chained(dir.path()));
            let again = fs::read(&path).unwrap();
            chain(dir.path(), entry()).unwrap();
            prop_assert_eq!(fs::read(&path).unwrap(), again);
        }
    }
}
