//! `serde` for [`Step`] (feature `serde`): the gateway's admin protocol carries queued steps as
//! JSON, `{"step": "exec", "argv": [...]}`, with a `verify` digest as 64 hex digits and `write`
//! contents as text, the format the operator CLI has always sent.

use alloc::borrow::Cow;
use alloc::vec::Vec;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{hex, parse_sha256, Step};

/// The JSON shape of a step; [`Step`] converts to and from it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "step")]
enum Json<'a> {
    Fetch {
        url: Cow<'a, str>,
        path: Cow<'a, str>,
    },
    Verify {
        path: Cow<'a, str>,
        sha256: Cow<'a, str>,
    },
    Write {
        path: Cow<'a, str>,
        mode: u32,
        contents: Cow<'a, str>,
    },
    Exec {
        argv: Vec<Cow<'a, str>>,
    },
    Reboot,
    Report,
    SlotSwitch {
        #[serde(default)]
        deadline_secs: u32,
    },
    SlotCommit,
}

impl Serialize for Step<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let json = match self {
            Step::Fetch { url, path } => Json::Fetch {
                url: Cow::Borrowed(url),
                path: Cow::Borrowed(path),
            },
            Step::Verify { path, sha256 } => Json::Verify {
                path: Cow::Borrowed(path),
                sha256: Cow::Owned(hex(sha256)),
            },
            Step::Write {
                path,
                mode,
                contents,
            } => Json::Write {
                path: Cow::Borrowed(path),
                mode: *mode,
                // The admin format carries text; binary contents have no JSON form here.
                contents: Cow::Borrowed(core::str::from_utf8(contents).map_err(|_| {
                    serde::ser::Error::custom("`write` contents are not UTF-8 text")
                })?),
            },
            Step::Exec { argv } => Json::Exec {
                argv: argv.iter().map(|a| Cow::Borrowed(&**a)).collect(),
            },
            Step::Reboot => Json::Reboot,
            Step::Report => Json::Report,
            Step::SlotSwitch { deadline_secs } => Json::SlotSwitch {
                deadline_secs: *deadline_secs,
            },
            Step::SlotCommit => Json::SlotCommit,
        };
        json.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Step<'static> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let owned = |c: Cow<'_, str>| Cow::Owned(c.into_owned());
        Ok(match Json::deserialize(d)? {
            Json::Fetch { url, path } => Step::Fetch {
                url: owned(url),
                path: owned(path),
            },
            Json::Verify { path, sha256 } => Step::Verify {
                path: owned(path),
                sha256: parse_sha256(&sha256).map_err(serde::de::Error::custom)?,
            },
            Json::Write {
                path,
                mode,
                contents,
            } => Step::Write {
                path: owned(path),
                mode,
                contents: Cow::Owned(contents.into_owned().into_bytes()),
            },
            Json::Exec { argv } => Step::Exec {
                argv: argv.into_iter().map(owned).collect(),
            },
            Json::Reboot => Step::Reboot,
            Json::Report => Step::Report,
            Json::SlotSwitch { deadline_secs } => Step::SlotSwitch { deadline_secs },
            Json::SlotCommit => Step::SlotCommit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_keep_the_admin_json_format() {
        let steps: Vec<Step<'static>> = match &super::super::samples::all()[5] {
            super::super::Message::Dispatch(d) => d.steps.clone(),
            _ => panic!("sample 5 is a dispatch"),
        };
        let json = serde_json::to_string(&steps).unwrap();
        let digest = "5a".repeat(32);
        assert_eq!(
            json,
            alloc::format!(
                "[{{\"step\":\"fetch\",\"url\":\"https://gw/pkg.deb\",\"path\":\"/tmp/pkg.deb\"}},\
                 {{\"step\":\"verify\",\"path\":\"/tmp/pkg.deb\",\"sha256\":\"{digest}\"}},\
                 {{\"step\":\"write\",\"path\":\"/etc/app.conf\",\"mode\":420,\"contents\":\"port=80\\n\"}},\
                 {{\"step\":\"exec\",\"argv\":[\"dpkg\",\"-i\",\"/tmp/pkg.deb\"]}},\
                 {{\"step\":\"reboot\"}},{{\"step\":\"report\"}},\
                 {{\"step\":\"slot_switch\",\"deadline_secs\":600}},{{\"step\":\"slot_commit\"}}]"
            )
        );
        let back: Vec<Step<'static>> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, steps);
        // Upper-case hex is accepted, as before.
        let upper: Step<'static> = serde_json::from_str(&alloc::format!(
            "{{\"step\":\"verify\",\"path\":\"/x\",\"sha256\":\"{}\"}}",
            "5A".repeat(32)
        ))
        .unwrap();
        assert_eq!(
            upper,
            Step::Verify {
                path: "/x".into(),
                sha256: [0x5A; 32]
            }
        );
    }

    #[test]
    fn bad_digests_and_binary_contents_are_refused() {
        let e = serde_json::from_str::<Step<'static>>(
            "{\"step\":\"verify\",\"path\":\"/x\",\"sha256\":\"abc\"}",
        )
        .unwrap_err();
        assert!(e.to_string().contains("64 hex digits"), "{e}");
        let e = serde_json::from_str::<Step<'static>>(&alloc::format!(
            "{{\"step\":\"verify\",\"path\":\"/x\",\"sha256\":\"{}\"}}",
            "zz".repeat(32)
        ))
        .unwrap_err();
        assert!(e.to_string().contains("is not a hex digit"), "{e}");
        let binary = Step::Write {
            path: "/x".into(),
            mode: 0o600,
            contents: Cow::Borrowed(&[0xff, 0xfe]),
        };
        assert!(serde_json::to_string(&binary).is_err());
    }
}
