//! Gateways of one cell: membership with a lease, device ownership, and the fence every write
//! for a device passes.
//!
//! Rules (all judged by the database's clock, `now()`, so the gateways' clocks never have
//! to agree):
//! - A gateway joins with a new incarnation each time it starts ([`Membership::join`]) and
//!   renews its lease every second or so ([`Membership::renew`]). A renewal after the lease
//!   ran out, or by an older incarnation, fails with [`CellError::LeaseLost`]: that gateway
//!   may already have lost devices, so it must stop acknowledging and join again.
//! - A device is owned by one (gateway, incarnation) at a time. [`Membership::claim`] takes
//!   it when it is unowned, already ours, or its owner's lease has expired (a
//!   compare-and-swap in one `UPDATE`: of gateways claiming at once exactly one wins), and
//!   otherwise names the live owner, for a redirect.
//! - Every transaction that writes for a device first takes [`Membership::fence`]: it locks
//!   the device's row and checks that we own it under a live lease. A claim by another
//!   gateway must update that row, so it waits for our commit and then sees the new state;
//!   a gateway that lost its lease, or a zombie of an earlier incarnation, gets
//!   [`CellError::Fenced`] and writes nothing.
//! - [`rendezvous`] says which live gateway should own a device (highest random weight):
//!   the same answer from every gateway and agent, and a gateway's leaving moves only its
//!   own devices.

use std::time::Duration;

use postgres::{Client, GenericClient};

use super::migrate::describe;

/// Why a cell operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CellError {
    /// This incarnation's lease ran out or a newer incarnation of the gateway joined.
    #[error("gateway {gateway} (incarnation {incarnation}) lost its lease: join the cell again")]
    LeaseLost {
        /// The gateway.
        gateway: String,
        /// The incarnation that lost it.
        incarnation: i64,
    },
    /// A write for a device this gateway does not own (under a live lease).
    #[error("device {device} is not owned by gateway {gateway} (incarnation {incarnation})")]
    Fenced {
        /// The device.
        device: i64,
        /// The gateway that tried.
        gateway: String,
        /// Its incarnation.
        incarnation: i64,
    },
    /// No such device.
    #[error("no device {0}")]
    NoDevice(i64),
    /// The thread that renews the lease could not be started.
    #[error("the cell lease thread could not start: {0}")]
    Thread(#[source] std::io::Error),
    /// The database could not be reached or refused the statement.
    #[error("PostgreSQL: {}", describe(.0))]
    Database(#[from] postgres::Error),
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The device is ours now.
    Owned,
    /// Another live gateway owns it: redirect the agent there.
    OwnedBy {
        /// Its id.
        gateway: String,
        /// Where agents reach it.
        addr: String,
    },
}

/// This gateway's membership of the cell: its id and incarnation.
#[derive(Debug, Clone)]
pub struct Membership {
    id: String,
    addr: String,
    incarnation: i64,
    lease: Duration,
}

fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

impl Membership {
    /// Joins the cell as gateway `id`, reached by agents at `addr`, with a lease of `lease`:
    /// a new incarnation, one above any before it.
    pub fn join(
        c: &mut Client,
        id: &str,
        addr: &str,
        lease: Duration,
    ) -> Result<Membership, CellError> {
        let row = c.query_one(
            "INSERT INTO gateways (id, incarnation, lease_until, addr)
             VALUES ($1, 1, now() + $3::text::interval, $2)
             ON CONFLICT (id) DO UPDATE SET incarnation = gateways.incarnation + 1,
                 lease_until = excluded.lease_until, addr = excluded.addr
             RETURNING incarnation",
            &[&id, &addr, &interval(lease)],
        )?;
        Ok(Membership {
            id: id.to_string(),
            addr: addr.to_string(),
            incarnation: row.get(0),
            lease,
        })
    }

    /// Joins again, as the next incarnation, after this one lost its lease.
    pub fn rejoin(&self, c: &mut Client) -> Result<Membership, CellError> {
        Membership::join(c, &self.id, &self.addr, self.lease)
    }

    /// Where agents reach this gateway.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The gateway's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// This incarnation.
    pub fn incarnation(&self) -> i64 {
        self.incarnation
    }

    fn lost(&self) -> CellError {
        CellError::LeaseLost {
            gateway: self.id.clone(),
            incarnation: self.incarnation,
        }
    }

    /// Extends the lease by its length from now, if it is still live and ours.
    pub fn renew(&self, c: &mut impl GenericClient) -> Result<(), CellError> {
        let n = c.execute(
            "UPDATE gateways SET lease_until = now() + $3::text::interval
             WHERE id = $1 AND incarnation = $2 AND lease_until > now()",
            &[&self.id, &self.incarnation, &interval(self.lease)],
        )?;
        if n == 1 {
            Ok(())
        } else {
            Err(self.lost())
        }
    }

    /// Ends this incarnation's lease now (a clean stop): its devices can be claimed at once.
    pub fn leave(&self, c: &mut impl GenericClient) -> Result<(), CellError> {
        c.execute(
            "UPDATE gateways SET lease_until = now()
             WHERE id = $1 AND incarnation = $2",
            &[&self.id, &self.incarnation],
        )?;
        Ok(())
    }

    /// Takes device `dev` if it is unowned, ours, or its owner's lease has expired; else
    /// names its live owner. Needs a live lease of our own.
    pub fn claim(&self, c: &mut impl GenericClient, dev: i64) -> Result<Claim, CellError> {
        let n = c.execute(
            "UPDATE devices d SET owner_gw = $1, owner_inc = $2
             WHERE d.id = $3
               AND EXISTS (SELECT 1 FROM gateways me
                           WHERE me.id = $1 AND me.incarnation = $2 AND me.lease_until > now())
               AND (d.owner_gw IS NULL
                    OR (d.owner_gw = $1 AND d.owner_inc = $2)
                    OR NOT EXISTS (SELECT 1 FROM gateways g
                                   WHERE g.id = d.owner_gw AND g.incarnation = d.owner_inc
                                     AND g.lease_until > now()))",
            &[&self.id, &self.incarnation, &dev],
        )?;
        if n == 1 {
            return Ok(Claim::Owned);
        }
        let owner = c.query_opt(
            "SELECT g.id, g.addr, g.incarnation = d.owner_inc AND g.lease_until > now()
             FROM devices d LEFT JOIN gateways g ON g.id = d.owner_gw
             WHERE d.id = $1",
            &[&dev],
        )?;
        let Some(row) = owner else {
            return Err(CellError::NoDevice(dev));
        };
        match (row.get::<_, Option<String>>(0), row.get(1), row.get(2)) {
            (Some(gateway), Some(addr), Some(true)) if gateway != self.id => {
                Ok(Claim::OwnedBy { gateway, addr })
            }
            // Unowned, ours, or a dead owner, and still not taken: our own lease is gone.
            _ => Err(self.lost()),
        }
    }

    /// Gives device `dev` up (if this incarnation holds it): unowned, the next gateway its
    /// agent says hello to claims it at once.
    pub fn release(&self, c: &mut impl GenericClient, dev: i64) -> Result<(), CellError> {
        c.execute(
            "UPDATE devices SET owner_gw = NULL, owner_inc = NULL
             WHERE id = $1 AND owner_gw = $2 AND owner_inc = $3",
            &[&dev, &self.id, &self.incarnation],
        )?;
        Ok(())
    }

    /// Checks, inside the transaction `t` that is about to write for device `dev`, that this
    /// incarnation owns it under a live lease, and locks the device's row until `t` ends, so
    /// no claim can take it before the write commits.
    pub fn fence(&self, t: &mut impl GenericClient, dev: i64) -> Result<(), CellError> {
        let owned = t.query_opt(
            "SELECT 1 FROM devices d
             WHERE d.id = $1 AND d.owner_gw = $2 AND d.owner_inc = $3
               AND EXISTS (SELECT 1 FROM gateways g
                           WHERE g.id = $2 AND g.incarnation = $3 AND g.lease_until > now())
             FOR UPDATE OF d",
            &[&dev, &self.id, &self.incarnation],
        )?;
        match owned {
            Some(_) => Ok(()),
            None => Err(CellError::Fenced {
                device: dev,
                gateway: self.id.clone(),
                incarnation: self.incarnation,
            }),
        }
    }
}

/// The live gateways of the cell: (id, addr), by id.
pub fn live_gateways(c: &mut impl GenericClient) -> Result<Vec<(String, String)>, CellError> {
    Ok(c.query(
        "SELECT id, addr FROM gateways WHERE lease_until > now() ORDER BY id",
        &[],
    )?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}

/// Which of `gateways` should own `device` (rendezvous hashing, as the agents choose:
/// [`fleetcast_wire::cell`]). `None` if there are none.
pub fn rendezvous<'a>(device: u64, gateways: &[&'a str]) -> Option<&'a str> {
    fleetcast_wire::cell::rendezvous(device, gateways)
}
