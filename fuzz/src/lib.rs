//! Helpers shared by the fuzz targets in `fuzz_targets/` (see README.md).

/// Splits a fuzz input into an xDS resource name and the resource's protobuf bytes: the first
/// byte is the name's length, then the name (lossy UTF-8), then the message. The seed
/// generator (`examples/seeds.rs`) writes seeds in this layout with [`named_resource`].
pub fn split_named(data: &[u8]) -> (String, &[u8]) {
    let Some((&len, rest)) = data.split_first() else {
        return (String::new(), data);
    };
    let len = usize::from(len).min(rest.len());
    let (name, bytes) = rest.split_at(len);
    (String::from_utf8_lossy(name).into_owned(), bytes)
}

/// The inverse of [`split_named`] (names longer than 255 bytes are cut).
pub fn named_resource(name: &str, bytes: &[u8]) -> Vec<u8> {
    let name = &name.as_bytes()[..name.len().min(255)];
    let mut out = Vec::with_capacity(1 + name.len() + bytes.len());
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_resources_split_back() {
        let data = named_resource("Kubernetes//Pod/ns/p", b"\x0a\x01x");
        assert_eq!(
            split_named(&data),
            ("Kubernetes//Pod/ns/p".to_owned(), &b"\x0a\x01x"[..])
        );
        assert_eq!(split_named(b""), (String::new(), &b""[..]));
        // A length longer than the input takes what is there.
        assert_eq!(split_named(b"\x09ab"), ("ab".to_owned(), &b""[..]));
    }
}
