//! Devices: enrolment tokens, enrolment, revocation, liveness, reports and groups.

use super::{Cx, Exec};
use crate::engine::DeviceOps;
use crate::error::{Error, Illegal, Missing, Result};
use fleetcast_wire as wire;

use crate::types::{DeviceId, EnrolmentToken, Transport};

impl<B: Exec> DeviceOps for B {
    fn add_enrolment_token(&mut self, hash: [u8; 32], token: EnrolmentToken) -> Result<()> {
        self.exec(move |cx| cx.t.put_token(&hash, &token))
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
            cx.t.put_device(&x)
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
            cx.t.put_device(&x)
        })
    }

    fn join_group(&mut self, group: &str, dev: DeviceId) -> Result<()> {
        let group = group.to_owned();
        self.exec(move |cx| {
            cx.device(dev)?;
            cx.t.add_member(&group, dev)
        })
    }

    fn leave_group(&mut self, group: &str, dev: DeviceId) -> Result<()> {
        let group = group.to_owned();
        self.exec(move |cx| cx.t.del_member(&group, dev))
    }
}

fn enrol(cx: &mut Cx<'_>, hash: &[u8; 32], credential: [u8; 32], now: u64) -> Result<u64> {
    let token: EnrolmentToken =
        cx.t.token(hash)?
            .ok_or(Error::NotFound(Missing::EnrolmentToken))?;
    if now > token.expires_ms {
        return Err(Error::IllegalTransition {
            device: None,
            kind: Illegal::TokenExpired,
        });
    }
    if cx.t.name_taken(&token.name)? {
        return Err(name_taken());
    }
    cx.t.del_token(hash)?;
    cx.new_device(&token.name, credential, now, &token.groups)
}

fn add_device(cx: &mut Cx<'_>, name: &str, credential: [u8; 32], now: u64) -> Result<u64> {
    if cx.t.name_taken(name)? {
        return Err(name_taken());
    }
    cx.new_device(name, credential, now, &[])
}

fn revoke(cx: &mut Cx<'_>, dev: DeviceId) -> Result<()> {
    let mut x = cx.device(dev)?;
    let mut q = cx.queue(dev)?;
    x.revoked = true;
    q.revoked = true;
    cx.t.put_device(&x)?;
    cx.put_queue(dev, &q)
}

fn name_taken() -> Error {
    Error::IllegalTransition {
        device: None,
        kind: Illegal::NameTaken,
    }
}
