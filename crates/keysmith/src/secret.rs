//! Raw keys, their format and checksum, and their SHA-256 hashes.
//!
//! A raw key reads `{prefix}_{environment}_{64 lowercase hex}`. The first 56 hex
//! are 28 bytes from the operating system's CSPRNG; the last 8 are the CRC32 of
//! everything before them, so a mistyped or truncated key is refused without
//! touching a cache or a store. Only the SHA-256 of a raw key is ever stored.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::error::{Error, Result};

/// Length of the hex body of a raw key.
pub const BODY_HEX_LEN: usize = 64;
const RANDOM_BYTES: usize = 28;
const CHECKSUM_HEX_LEN: usize = 8;
/// Longest accepted prefix or environment name.
pub const MAX_SEGMENT_LEN: usize = 16;
/// Longest possible raw key; anything longer is refused before parsing.
pub const MAX_RAW_KEY_LEN: usize = MAX_SEGMENT_LEN * 2 + 2 + BODY_HEX_LEN;
/// The prefix used when none is given.
pub const DEFAULT_PREFIX: &str = "sk";

fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SEGMENT_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Checks a key prefix: 1–16 characters of `[a-z0-9]`.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if is_segment(prefix) {
        Ok(())
    } else {
        Err(Error::invalid_input(
            "prefix",
            "must be 1-16 characters of [a-z0-9]",
        ))
    }
}

/// The environment a key belongs to; it is part of the raw key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Environment {
    /// `live`: production traffic (the default).
    #[default]
    Live,
    /// `test`.
    Test,
    /// `staging`.
    Staging,
    /// Any other name of 1–16 characters of `[a-z0-9]`.
    Custom(String),
}

impl Environment {
    /// The name as it appears in raw keys and in the API.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Live => "live",
            Self::Test => "test",
            Self::Staging => "staging",
            Self::Custom(s) => s,
        }
    }
}

impl FromStr for Environment {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "live" => Self::Live,
            "test" => Self::Test,
            "staging" => Self::Staging,
            other if is_segment(other) => Self::Custom(other.to_owned()),
            _ => {
                return Err(Error::invalid_input(
                    "environment",
                    "must be live, test, staging or 1-16 characters of [a-z0-9]",
                ));
            }
        })
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Environment {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some("live, test, staging or 1-16 characters of [a-z0-9]"))
            .pattern(Some("^[a-z0-9]{1,16}$"))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Environment {}

impl Serialize for Environment {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Environment {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A raw API key: the secret itself. It exists once, when a key is created or
/// rotated, and is handed to the caller. `Debug` and `Display` never print it,
/// and its memory is zeroed on drop.
pub struct RawKey(String);

impl RawKey {
    /// Generates a fresh key with 28 bytes from the OS CSPRNG.
    pub fn generate(prefix: &str, environment: &Environment) -> Result<Self> {
        validate_prefix(prefix)?;
        let mut random = [0u8; RANDOM_BYTES];
        getrandom::fill(&mut random)
            .map_err(|e| Error::store(std::io::Error::other(format!("OS random source: {e}"))))?;
        let env = environment.as_str();
        let mut s = String::with_capacity(prefix.len() + env.len() + 2 + BODY_HEX_LEN);
        s.push_str(prefix);
        s.push('_');
        s.push_str(env);
        s.push('_');
        s.push_str(&hex::encode(random));
        random.zeroize();
        let crc = crc32fast::hash(s.as_bytes());
        s.push_str(&format!("{crc:08x}"));
        Ok(Self(s))
    }

    /// Wraps a string the caller already holds, checking its format and checksum.
    pub fn parse(s: &str) -> Result<Self> {
        ParsedKey::parse(s).ok_or(Error::InvalidKey)?;
        Ok(Self(s.to_owned()))
    }

    /// The secret, for handing to its owner exactly once.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// The SHA-256 of the key, as stored.
    pub fn hash(&self) -> SecretHash {
        SecretHash::of(&self.0)
    }

    /// The last four characters, shown in lists so owners can tell keys apart.
    pub fn hint(&self) -> String {
        self.0[self.0.len() - 4..].to_owned()
    }
}

impl Drop for RawKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for RawKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RawKey([REDACTED])")
    }
}

impl fmt::Display for RawKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// The parts of a well-formed raw key, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    /// The prefix (`sk`).
    pub prefix: &'a str,
    /// The environment name (`live`).
    pub environment: &'a str,
}

impl<'a> ParsedKey<'a> {
    /// Parses a raw key and checks its checksum, without allocating. `None` for
    /// anything that is not a well-formed key. This runs before every lookup,
    /// so it is one pass over bytes with table lookups and no branches per
    /// hex digit.
    pub fn parse(s: &'a str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() > MAX_RAW_KEY_LEN || bytes.len() < BODY_HEX_LEN + 4 {
            return None;
        }
        let body_start = bytes.len() - BODY_HEX_LEN;
        if bytes[body_start - 1] != b'_' {
            return None;
        }
        // Every body byte must be a lowercase hex digit: OR the table values
        // together and check no byte was marked invalid.
        let body = &bytes[body_start..];
        if body.iter().fold(0u8, |acc, &b| acc | HEX[b as usize]) & INVALID != 0 {
            return None;
        }
        // `{prefix}_{environment}`: exactly one `_`, both parts segments. The
        // head is all ASCII, so slicing the str at byte offsets is sound.
        let head = &s[..body_start - 1];
        let sep = head.bytes().position(|b| b == b'_')?;
        let (prefix, environment) = (&head[..sep], &head[sep + 1..]);
        if !is_segment(prefix) || !is_segment(environment) {
            return None;
        }
        let split = bytes.len() - CHECKSUM_HEX_LEN;
        let given = bytes[split..]
            .iter()
            .fold(0u32, |acc, &b| (acc << 4) | u32::from(HEX[b as usize]));
        (crc32fast::hash(&bytes[..split]) == given).then_some(Self {
            prefix,
            environment,
        })
    }
}

const INVALID: u8 = 0x80;

/// Value of each byte as a lowercase hex digit, or `INVALID`.
static HEX: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// The SHA-256 of a raw key. Not secret in itself (it cannot be reversed),
/// but never needed outside the stores, so it is not serialized.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretHash([u8; 32]);

impl SecretHash {
    /// Hashes a raw key string.
    pub fn of(raw: &str) -> Self {
        Self(Sha256::digest(raw.as_bytes()).into())
    }

    /// The hash as bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses 64 hex characters (the form stores keep).
    pub fn from_hex(s: &str) -> Result<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| Error::invalid_input("hash", "must be 64 hex characters"))?;
        Ok(Self(out))
    }

    /// Lowercase hex, as stored in `keysmith_keys.hash`.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Constant-time equality, for the final comparison after a lookup: the
    /// words are XORed together without branching, and the one remaining
    /// comparison goes through `subtle`.
    pub fn ct_eq(&self, other: &Self) -> bool {
        let mut diff = 0u64;
        for (a, b) in self.0.chunks_exact(8).zip(other.0.chunks_exact(8)) {
            let a = u64::from_ne_bytes(a.try_into().expect("8 bytes"));
            let b = u64::from_ne_bytes(b.try_into().expect("8 bytes"));
            diff |= a ^ b;
        }
        diff.ct_eq(&0).into()
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretHash({}…)", hex::encode(&self.0[..4]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let key = RawKey::generate("sk", &Environment::Live).unwrap();
        let s = key.expose_secret();
        assert!(s.starts_with("sk_live_"));
        assert_eq!(s.len(), "sk_live_".len() + 64);
        assert_eq!(
            ParsedKey::parse(s),
            Some(ParsedKey {
                prefix: "sk",
                environment: "live"
            })
        );
        assert_eq!(key.hint(), s[s.len() - 4..]);
        assert_eq!(key.hash(), SecretHash::of(s));
        assert_eq!(key.hash().to_hex().len(), 64);
        assert_eq!(
            SecretHash::from_hex(&key.hash().to_hex()).unwrap(),
            key.hash()
        );
    }

    #[test]
    fn debug_and_display_never_print_the_secret() {
        let key = RawKey::generate("sk", &Environment::Test).unwrap();
        let body = &key.expose_secret()[8..];
        for printed in [
            format!("{key:?}"),
            format!("{key}"),
            format!("{:?}", key.hash()),
        ] {
            assert!(!printed.contains(body), "{printed}");
            assert!(!printed.contains(&body[..16]), "{printed}");
        }
    }

    #[test]
    fn malformed_keys_are_refused() {
        let good = RawKey::generate("ab1", &Environment::Staging).unwrap();
        let s = good.expose_secret().to_owned();
        assert!(ParsedKey::parse(&s).is_some());
        let too_long_prefix = format!("{}_live_{}", "a".repeat(17), &s[s.len() - 64..]);
        let cases = [
            String::new(),
            "sk_live_".into(),
            s[..s.len() - 1].to_owned(),
            format!("{s}0"),
            s.to_uppercase(),
            s.replacen("ab1_", "AB1_", 1),
            s.replacen("ab1_", "", 1),
            format!("x{s}"),
            too_long_prefix,
            s.replacen('_', "-", 1),
        ];
        for case in &cases {
            assert!(ParsedKey::parse(case).is_none(), "{case}");
            assert!(RawKey::parse(case).is_err());
        }
    }

    #[test]
    fn prefixes_and_environments_are_checked() {
        for ok in ["sk", "a", "abcdefghij012345"] {
            validate_prefix(ok).unwrap();
        }
        for bad in ["", "SK", "s_k", "abcdefghij0123456", "sk-", "ß"] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
        assert_eq!("live".parse::<Environment>().unwrap(), Environment::Live);
        assert_eq!(
            "staging".parse::<Environment>().unwrap(),
            Environment::Staging
        );
        assert_eq!(
            "dev2".parse::<Environment>().unwrap(),
            Environment::Custom("dev2".into())
        );
        for bad in ["", "Live", "pre_prod", "a".repeat(17).as_str()] {
            assert!(bad.parse::<Environment>().is_err(), "{bad}");
        }
    }

    fn segment() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,16}"
    }

    proptest! {
        #[test]
        fn generate_then_parse_round_trips(prefix in segment(), env in segment()) {
            let env: Environment = env.parse().unwrap();
            let key = RawKey::generate(&prefix, &env).unwrap();
            let parsed = ParsedKey::parse(key.expose_secret()).unwrap();
            prop_assert_eq!(parsed.prefix, prefix.as_str());
            prop_assert_eq!(parsed.environment, env.as_str());
            prop_assert!(RawKey::parse(key.expose_secret()).is_ok());
        }

        #[test]
        fn parser_never_panics_on_strings(s in "\\PC{0,120}") {
            let _ = ParsedKey::parse(&s);
        }

        #[test]
        fn parser_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let s = String::from_utf8_lossy(&bytes);
            let _ = ParsedKey::parse(&s);
        }

        #[test]
        fn parser_never_panics_on_near_keys(tail in "[a-f0-9_A-Z]{0,80}", prefix in "[a-z_]{0,20}") {
            let _ = ParsedKey::parse(&format!("{prefix}_live_{tail}"));
        }

        #[test]
        fn one_changed_character_fails_the_checksum(
            prefix in segment(),
            index in any::<prop::sample::Index>(),
            replacement in "[a-z0-9]",
        ) {
            let key = RawKey::generate(&prefix, &Environment::Live).unwrap();
            let s = key.expose_secret();
            let i = index.index(s.len());
            let original = &s[i..=i];
            let replacement = if replacement == original {
                if original == "0" { "1" } else { "0" }
            } else {
                replacement.as_str()
            };
            let mut changed = s.to_owned();
            changed.replace_range(i..=i, replacement);
            prop_assert!(ParsedKey::parse(&changed).is_none(), "{} accepted", changed);
        }
    }
}
