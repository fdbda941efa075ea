//! What the Gateway API conformance backends (`echo-basic`) let a test ask of them through the
//! query string, which the HTTPRoute timeout and retry tests rely on:
//! - `?delay=<duration>` (`500ms`, `1s`, `1.5s`): the answer waits that long;
//! - `?responseCode=<code>&succeedAfter=<n>&uuid=<id>`: the first `n` requests with that `uuid`
//!   are answered with `code` (no body fields), later ones normally, so a test can see how many
//!   attempts a proxy made;
//! - a request header `x-echo-log: <id>` makes the app print `logged <id> <method> <path>` on
//!   stderr (its log), so a test can see that a mirrored copy reached this pod.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use http::StatusCode;

/// The request header whose value the app logs.
pub const LOG_HEADER: &str = "x-echo-log";

/// The longest `delay` served.
const MAX_DELAY: Duration = Duration::from_secs(60);

/// How many `uuid`s are remembered before the table is cleared (a bound, not a cache policy).
const MAX_TRACKED: usize = 10_000;

/// Attempts seen per `uuid`.
static ATTEMPTS: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);

/// The value of query parameter `key`.
fn param<'a>(uri: &'a http::Uri, key: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// `?delay=`: a duration in `ms` or `s` (fractions allowed), at most a minute.
pub fn delay(uri: &http::Uri) -> Result<Option<Duration>, String> {
    let Some(v) = param(uri, "delay") else {
        return Ok(None);
    };
    let bad = || format!("delay={v:?}: give a duration such as 500ms or 1s, at most 60s");
    let (num, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(bad());
    };
    let secs = num.parse::<f64>().map_err(|_| bad())? * scale;
    if !(0.0..=MAX_DELAY.as_secs_f64()).contains(&secs) {
        return Err(bad());
    }
    Ok(Some(Duration::from_secs_f64(secs)))
}

/// `?responseCode=&succeedAfter=&uuid=`: the status this attempt must fail with, if it must;
/// counts the attempt. A malformed simulation is an error naming the parameter.
pub fn failure(uri: &http::Uri) -> Result<Option<StatusCode>, String> {
    let (Some(code), Some(after), Some(id)) = (
        param(uri, "responseCode"),
        param(uri, "succeedAfter"),
        param(uri, "uuid"),
    ) else {
        return Ok(None);
    };
    let code = code
        .parse::<u16>()
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| format!("responseCode={code:?}: give an HTTP status code"))?;
    let after = after
        .parse::<u32>()
        .map_err(|_| format!("succeedAfter={after:?}: give a number of failing attempts"))?;
    let mut guard = ATTEMPTS.lock().unwrap_or_else(|p| p.into_inner());
    let table = guard.get_or_insert_with(HashMap::new);
    if table.len() >= MAX_TRACKED && !table.contains_key(id) {
        table.clear();
    }
    let seen = table.entry(id.to_owned()).or_insert(0);
    *seen += 1;
    Ok((*seen <= after).then_some(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> http::Uri {
        s.parse().unwrap()
    }

    #[test]
    fn delays_parse_and_are_bounded() {
        assert_eq!(delay(&uri("/a")).unwrap(), None);
        assert_eq!(
            delay(&uri("/a?x=1&delay=1s")).unwrap(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            delay(&uri("/a?delay=500ms")).unwrap(),
            Some(Duration::from_millis(500))
        );
        for bad in ["/a?delay=1", "/a?delay=xs", "/a?delay=61s", "/a?delay=-1s"] {
            assert!(delay(&uri(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn failures_are_counted_per_uuid() {
        let u = uri("/r?responseCode=503&succeedAfter=2&uuid=t-counted");
        assert_eq!(failure(&u).unwrap(), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(failure(&u).unwrap(), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(failure(&u).unwrap(), None);
        let other = uri("/r?responseCode=500&succeedAfter=1&uuid=t-other");
        assert_eq!(
            failure(&other).unwrap(),
            Some(StatusCode::INTERNAL_SERVER_ERROR)
        );
        assert_eq!(failure(&uri("/r?responseCode=500")).unwrap(), None);
        assert!(failure(&uri("/r?responseCode=x&succeedAfter=1&uuid=a")).is_err());
        assert!(failure(&uri("/r?responseCode=500&succeedAfter=-1&uuid=a")).is_err());
    }
}
