//! What an endpoint is for policy: its network's name and its labels.
//! Checked once where a runtime hands them in (`netd attach`, CNI, Docker),
//! so that what is published in etcd and compiled into identities is always
//! well formed.

use std::collections::BTreeMap;

use crate::policy::DEFAULT_NETWORK;

/// Why a network name or a label is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LabelError {
    #[error(
        "network name {0:?} must be 1 to {MAX_NETWORK} characters of letters, digits, '-', '_' and '.', starting with a letter or digit"
    )]
    Network(String),
    #[error("label {0:?} is not KEY=VALUE")]
    NotKeyValue(String),
    #[error(
        "label key {0:?} must be [PREFIX/]NAME: NAME 1 to 63 characters of letters, digits, '-', '_' and '.' starting and ending with a letter or digit, PREFIX a DNS subdomain of at most 253 characters"
    )]
    Key(String),
    #[error(
        "label value {value:?} of {key:?} must be at most {MAX_VALUE} characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
    )]
    Value { key: String, value: String },
}

/// Docker network ids (64 hex digits) must fit.
pub const MAX_NETWORK: usize = 128;
/// Kubernetes' label value limit is 63; pod names (DNS subdomains) reach 253.
pub const MAX_VALUE: usize = 253;
const MAX_NAME: usize = 63;
const MAX_PREFIX: usize = 253;

fn word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Letters, digits, '-', '_', '.', alphanumeric at both ends.
fn word(s: &str, max: usize) -> bool {
    let ends = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    !s.is_empty()
        && s.len() <= max
        && s.chars().all(word_char)
        && ends(s.chars().next())
        && ends(s.chars().last())
}

fn dns_subdomain(s: &str) -> bool {
    s.len() <= MAX_PREFIX
        && s.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= 63
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

pub fn check_network(name: &str) -> Result<(), LabelError> {
    let first = name.chars().next();
    if name.is_empty()
        || name.len() > MAX_NETWORK
        || !first.is_some_and(|c| c.is_ascii_alphanumeric())
        || !name.chars().all(word_char)
    {
        return Err(LabelError::Network(name.to_string()));
    }
    Ok(())
}

pub fn check_label(key: &str, value: &str) -> Result<(), LabelError> {
    let name = match key.split_once('/') {
        Some((prefix, name)) if dns_subdomain(prefix) => name,
        Some(_) => return Err(LabelError::Key(key.to_string())),
        None => key,
    };
    if !word(name, MAX_NAME) {
        return Err(LabelError::Key(key.to_string()));
    }
    if !value.is_empty() && !word(value, MAX_VALUE) {
        return Err(LabelError::Value {
            key: key.to_string(),
            value: value.to_string(),
        });
    }
    Ok(())
}

pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), LabelError> {
    labels.iter().try_for_each(|(k, v)| check_label(k, v))
}

/// `KEY=VALUE`, as `netd attach --label` takes it.
pub fn parse_label(text: &str) -> Result<(String, String), LabelError> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| LabelError::NotKeyValue(text.to_string()))?;
    check_label(key, value)?;
    Ok((key.to_string(), value.to_string()))
}

/// The network an endpoint record names, `default` for records without.
pub fn network_of(network: Option<&str>) -> &str {
    network.unwrap_or(DEFAULT_NETWORK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        for good in ["default", "blue", "web-1", "a.b_c", &"f".repeat(64)] {
            assert_eq!(check_network(good), Ok(()), "{good}");
        }
        for bad in ["", "-x", ".x", "a/b", "a b", "ä", &"f".repeat(129), "a\0b"] {
            assert!(check_network(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn labels() {
        for (k, v) in [
            ("app", "web"),
            ("app", ""),
            ("io.kubernetes.pod.namespace", "shop"),
            ("example.com/tier", "front-end"),
            ("a", "x.y_z-1"),
            ("io.kubernetes.pod.name", &"p".repeat(200)),
        ] {
            assert_eq!(check_label(k, v), Ok(()), "{k}={v}");
        }
        for (k, v) in [
            ("", "x"),
            ("-app", "x"),
            ("app-", "x"),
            ("a b", "x"),
            ("Example.com/x", "y"),
            ("/x", "y"),
            ("x/", "y"),
            ("a/b/c", "y"),
            (&"k".repeat(64), "y"),
            ("app", "-web"),
            ("app", "w b"),
            ("app", "a=b"),
            ("app", &"v".repeat(254)),
        ] {
            assert!(check_label(k, v).is_err(), "{k:?}={v:?}");
        }
    }

    #[test]
    fn label_flags() {
        assert_eq!(
            parse_label("app=web"),
            Ok(("app".to_string(), "web".to_string()))
        );
        assert_eq!(parse_label("app="), Ok(("app".to_string(), String::new())));
        assert_eq!(
            parse_label("app"),
            Err(LabelError::NotKeyValue("app".into()))
        );
        assert!(parse_label("=web").is_err());
        assert!(parse_label("app=a=b").is_err());
    }
}
