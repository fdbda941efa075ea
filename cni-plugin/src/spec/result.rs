//! The previous plugin's result (`prevResult`) and its conversion between result
//! versions (SPEC.md §5 "ADD Success", the reference `convertTo04x`/`convertFrom04x`).
//!
//! The result stays JSON: the conversion edits exactly the keys that differ between
//! layouts and passes everything else through, so fields a primary plugin adds beyond
//! the spec survive the chain.
//!
//! | to | `ips[].version` | `interfaces[].mtu`, `socketPath`, `pciID` (1.1.0) |
//! |---|---|---|
//! | 0.3.0, 0.3.1, 0.4.0 | set to `"4"`/`"6"` from the address family | removed |
//! | 1.0.0, 1.1.0 | removed | kept |

use std::net::IpAddr;

use serde_json::{Map, Value};

use super::{CniError, CniVersion};

/// Interface keys added in 1.1.0 that the 0.3.x/0.4.0 layout does not have.
const INTERFACE_KEYS_SINCE_1_1: [&str; 3] = ["mtu", "socketPath", "pciID"];

/// A validated `prevResult`.
#[derive(Debug, Clone, PartialEq)]
pub struct PrevResult(Map<String, Value>);

fn invalid(reason: String) -> CniError {
    CniError::Decode {
        what: "prevResult",
        reason,
    }
}

/// Parses `addr/prefix` as CNI writes addresses.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, prefix) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((addr, prefix))
}

impl PrevResult {
    /// Validates the parts of the layout the plugin reads or rewrites: `ips` must be an
    /// array of objects with a CIDR `address`, `interfaces` and `routes` arrays of
    /// objects, `dns` an object. A `cniVersion` that is not one of
    /// [`SUPPORTED_VERSIONS`](super::SUPPORTED_VERSIONS) (exactly, like the configuration's)
    /// and results before 0.3.0 (`ip4`/`ip6`) are refused with code 1 (SPEC.md §5 "Error");
    /// an absent or empty one means the configuration's version, as the reference reads it.
    pub fn parse(map: Map<String, Value>) -> Result<Self, CniError> {
        if let Some(declared) = map.get("cniVersion") {
            let declared = declared
                .as_str()
                .ok_or_else(|| invalid("cniVersion is not a string".into()))?;
            if !declared.is_empty() && CniVersion::from_declared(declared).is_none() {
                return Err(CniError::PrevResultVersion {
                    declared: declared.to_owned(),
                });
            }
        }
        if !map.contains_key("ips") && (map.contains_key("ip4") || map.contains_key("ip6")) {
            return Err(CniError::PrevResultVersion {
                declared: "0.2.0 (ip4/ip6 layout)".to_owned(),
            });
        }
        for key in ["interfaces", "ips", "routes"] {
            match map.get(key) {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) if items.iter().all(Value::is_object) => {}
                Some(_) => return Err(invalid(format!("{key} must be an array of objects"))),
            }
        }
        if !matches!(map.get("dns"), None | Some(Value::Null | Value::Object(_))) {
            return Err(invalid("dns must be an object".into()));
        }
        let ips = map
            .get("ips")
            .and_then(Value::as_array)
            .into_iter()
            .flatten();
        for (i, ip) in ips.enumerate() {
            let address = ip.get("address").and_then(Value::as_str);
            if address.and_then(parse_cidr).is_none() {
                return Err(invalid(format!(
                    "ips[{i}].address {} is not an address in CIDR notation",
                    ip.get("address").unwrap_or(&Value::Null)
                )));
            }
            if ip.get("interface").is_some_and(|i| !i.is_u64()) {
                return Err(invalid(format!(
                    "ips[{i}].interface is not an index into interfaces"
                )));
            }
        }
        Ok(Self(map))
    }

    /// The `address` of every entry of `ips`, in order (e.g. `10.244.1.5/24`).
    pub fn addresses(&self) -> Vec<String> {
        self.ips()
            .filter_map(|ip| ip.get("address").and_then(Value::as_str))
            .map(str::to_owned)
            .collect()
    }

    fn ips(&self) -> impl Iterator<Item = &Map<String, Value>> {
        let ips = self.0.get("ips").and_then(Value::as_array);
        ips.into_iter().flatten().filter_map(Value::as_object)
    }

    /// The result converted to `version`, labelled with it: what an ADD prints.
    pub fn to_version(&self, version: CniVersion) -> Value {
        let mut out = self.0.clone();
        out.insert("cniVersion".into(), Value::from(version.as_str()));
        if let Some(Value::Array(ips)) = out.get_mut("ips") {
            for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
                if version.is_legacy() {
                    let family = ip
                        .get("address")
                        .and_then(Value::as_str)
                        .and_then(parse_cidr)
                        .map(|(addr, _)| match addr.to_canonical() {
                            IpAddr::V4(_) => "4",
                            IpAddr::V6(_) => "6",
                        });
                    if let Some(family) = family {
                        ip.insert("version".into(), Value::from(family));
                    }
                } else {
                    ip.remove("version");
                }
            }
        }
        if version.is_legacy()
            && let Some(Value::Array(interfaces)) = out.get_mut("interfaces")
        {
            for interface in interfaces.iter_mut().filter_map(Value::as_object_mut) {
                for key in INTERFACE_KEYS_SINCE_1_1 {
                    interface.remove(key);
                }
            }
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: Value) -> Result<PrevResult, CniError> {
        match v {
            Value::Object(map) => PrevResult::parse(map),
            _ => unreachable!("tests pass objects"),
        }
    }

    fn bridge_1_1() -> Value {
        json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "cni0", "mac": "6e:1f:3a:00:00:01"},
                {"name": "veth1", "mac": "6e:1f:3a:00:00:02", "mtu": 1500, "vendorExtra": {"a": 1}},
                {"name": "eth0", "mac": "6e:1f:3a:00:00:03", "sandbox": "/var/run/netns/x",
                 "mtu": 1500, "socketPath": "/s", "pciID": "0000:00:1f.6"}
            ],
            "ips": [
                {"interface": 2, "address": "10.244.1.5/24", "gateway": "10.244.1.1"},
                {"interface": 2, "address": "fd00::5/64"}
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1", "priority": 5, "x": true}],
            "dns": {"nameservers": ["10.96.0.10"], "x": "kept"},
            "topLevelExtra": 7
        })
    }

    #[test]
    fn to_legacy_adds_ip_versions_and_drops_1_1_interface_keys() {
        let r = parse(bridge_1_1()).unwrap();
        let out = r.to_version(CniVersion::V0_3_1);
        assert_eq!(out["cniVersion"], "0.3.1");
        assert_eq!(out["ips"][0]["version"], "4");
        assert_eq!(out["ips"][1]["version"], "6");
        assert_eq!(
            out["interfaces"][2],
            json!({"name": "eth0", "mac": "6e:1f:3a:00:00:03", "sandbox": "/var/run/netns/x"})
        );
        assert_eq!(out["interfaces"][1]["vendorExtra"], json!({"a": 1}));
        assert_eq!(out["routes"], bridge_1_1()["routes"]);
        assert_eq!(out["dns"], bridge_1_1()["dns"]);
        assert_eq!(out["topLevelExtra"], 7);
        assert_eq!(r.addresses(), vec!["10.244.1.5/24", "fd00::5/64"]);
    }

    #[test]
    fn to_current_drops_ip_versions_and_keeps_the_rest() {
        let mut legacy = parse(bridge_1_1()).unwrap().to_version(CniVersion::V0_4_0);
        legacy["ips"][0]["version"] = json!("4");
        let out = parse(legacy.clone())
            .unwrap()
            .to_version(CniVersion::V1_1_0);
        assert_eq!(out["cniVersion"], "1.1.0");
        assert!(out["ips"][0].get("version").is_none());
        assert_eq!(out["ips"][0]["gateway"], "10.244.1.1");
        // Same-version echo is the identity.
        let same = parse(bridge_1_1()).unwrap().to_version(CniVersion::V1_1_0);
        assert_eq!(same, bridge_1_1());
        // A v4-mapped v6 address counts as IPv4, like the reference.
        let mapped = parse(json!({"ips": [{"address": "::ffff:10.0.0.1/120"}]})).unwrap();
        assert_eq!(
            mapped.to_version(CniVersion::V0_3_0)["ips"][0]["version"],
            "4"
        );
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        for bad in [
            json!({"ips": [{"address": "10.0.0.1"}]}),
            json!({"ips": [{"address": "10.0.0.1/33"}]}),
            json!({"ips": [{"address": "10.0.0.1/24", "interface": -1}]}),
            json!({"ips": {}}),
            json!({"interfaces": ["eth0"]}),
            json!({"dns": []}),
            json!({"cniVersion": 1}),
        ] {
            assert_eq!(parse(bad.clone()).unwrap_err().code(), 6, "{bad}");
        }
        for declared in [
            "7.0.0",
            "1.2.0",
            "0.5.0",
            "1.0",
            "1.0.0-rc1",
            " 1.0.0",
            "0.1.0",
        ] {
            let err = parse(json!({"cniVersion": declared, "ips": []})).unwrap_err();
            assert_eq!(err.code(), 1, "{declared}");
            assert!(err.to_string().contains(declared), "{err}");
        }
        assert!(parse(json!({"cniVersion": "", "ips": []})).is_ok());
        assert_eq!(
            parse(json!({"cniVersion": "0.2.0", "ip4": {}}))
                .unwrap_err()
                .code(),
            1
        );
        assert_eq!(
            parse(json!({"ip4": {"ip": "10.0.0.1/24"}}))
                .unwrap_err()
                .code(),
            1
        );
        assert!(parse(json!({})).unwrap().addresses().is_empty());
    }
}
