//! Devices: enrolment tokens, enrolment, revocation, liveness, reports and groups.

use super::{Batch, Cx};
use crate::engine::DeviceOps;
use crate::env;
use crate::error::{Error, Illegal, Missing, Result};
use fleetcast_wire as wire;

use crate::types::{DeviceId, EnrolmentToken, Transport};

impl DeviceOps for Batch<'_> {
    fn add_enrolment_token(&mut self, hash: [u8; 32], token: EnrolmentToken) -> Result<()> {
        self.exec(move |cx| cx.put(cx.d.enrol_tokens, &hash, &token))
    }

    fn enrol(
        &mut self,
        token_hash: [u8; 32],
        credential: [u8; 32],
        now_ms: u64,
    ) -> Result<DeviceId> {
        self.exec(move |cx| enrol(cx, &token_hash, credential, now_ms))
            .map(DeviceId)
    }

    fn add_device(&mut self, name: &str, credential: [u8; 32], now_ms: u64) -> Result<DeviceId> {
        let name = name.to_owned();
        self.exec(move |cx| add_device(cx, &name, credential, now_ms))
            .map(DeviceId)
    }

    fn revoke(&mut self, dev: DeviceId) -> Result<()> {
        self.exec(move |cx| revoke(cx, dev))
    }

    fn device_seen(
        &mut self,
        dev: DeviceId,
        now_ms: u64,
        transport: Option<Transport>,
    ) -> Result<()> {
        self.exec(move |cx| {
            let mut x = cx.device(dev)?;
            x.last_seen_ms = Some(now_ms);
            if transport.is_some() {
                x.transport = transport;
            }
            cx.put(cx.d.devices, &dev.0.to_be_bytes(), &x)
        })
    }

    fn set_report(
        &mut self,
        dev: DeviceId,
        report: wire::ConfigReport<'static>,
        now_ms: u64,
    ) -> Result<()> {
        self.exec(move |cx| {
            let mut x = cx.device(dev)?;
            x.last_seen_ms = Some(now_ms);
            x.report = Some(report.clone());
            x.report_ms = Some(now_ms);
            cx.put(cx.d.devices, &dev.0.to_be_bytes(), &x)
        })
    }

    fn join_group(&mut self, group: &str, dev: DeviceId) -> Result<()> {
        let group = group.to_owned();
        self.exec(move |cx| {
            cx.device(dev)?;
            cx.put_raw(cx.d.groups, &env::group_key(&group, dev), &[])
        })
    }

    fn leave_group(&mut self, group: &str, dev: DeviceId) -> Result<()> {
        let group = group.to_owned();
        self.exec(move |cx| cx.del(cx.d.groups, &env::group_key(&group, dev)))
    }
}

fn enrol(cx: &mut Cx<'_, '_>, hash: &[u8; 32], credential: [u8; 32], now: u64) -> Result<u64> {
    let d = *cx.d;
    let token: EnrolmentToken =
        env::get(&*cx.t, d.enrol_tokens, hash)?.ok_or(Error::NotFound(Missing::EnrolmentToken))?;
    if now > token.expires_ms {
        return Err(Error::IllegalTransition {
            device: None,
            kind: Illegal::TokenExpired,
        });
    }
    if env::exists(&*cx.t, d.device_names, token.name.as_bytes())? {
        return Err(name_taken());
    }
    cx.del(d.enrol_tokens, hash)?;
    cx.new_device(&token.name, credential, now, &token.groups)
}

fn add_device(cx: &mut Cx<'_, '_>, name: &str, credential: [u8; 32], now: u64) -> Result<u64> {
    if env::exists(&*cx.t, cx.d.device_names, name.as_bytes())? {
        return Err(name_taken());
    }
    cx.new_device(name, credential, now, &[])
}

fn revoke(cx: &mut Cx<'_, '_>, dev: DeviceId) -> Result<()> {
    let mut x = cx.device(dev)?;
    let mut q = cx.queue(dev)?;
    x.revoked = true;
    q.revoked = true;
    cx.put(cx.d.devices, &dev.0.to_be_bytes(), &x)?;
    cx.put_queue(dev, &q)
}

fn name_taken() -> Error {
    Error::IllegalTransition {
        device: None,
        kind: Illegal::NameTaken,
    }
}
