//! Per VM: register it, run its shim slots, probe it, fault it, register
//! it again; and the negative commands.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxy_proto::Command;
use serde_json::json;

use crate::agent::{self, AgentCtl, Listeners};
use crate::wire::{self, Rt};
use crate::{Rng, Soak, VmState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Late,
    Error,
    CloseCtl,
    CloseIo,
    GarbageCtl,
    GarbageIo,
}

/// Drive VM `i` until the soak stops, then shut it down cleanly.
pub async fn drive(soak: Arc<Soak>, i: usize, dir: PathBuf, slots: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let vm = Arc::new(VmState {
        cid: format!("soak-vm-{i}"),
        ctl_path: dir.join("ctl.sock"),
        io_path: dir.join("io.sock"),
        epoch: tokio::sync::watch::channel(0).0,
        dying: Default::default(),
        gate: tokio::sync::RwLock::new(()),
        tokens: Mutex::new(vec![None; slots]),
    });
    let listeners = match (
        tokio::net::UnixListener::bind(&vm.ctl_path),
        tokio::net::UnixListener::bind(&vm.io_path),
    ) {
        (Ok(ctl), Ok(io)) => Listeners { ctl, io },
        (a, b) => {
            soak.check(false, || {
                format!("{}: bind: {:?} {:?}", vm.cid, a.err(), b.err())
            });
            return;
        }
    };
    let mut slot_tasks = Vec::new();
    for s in 0..slots {
        let (soak, vm) = (soak.clone(), vm.clone());
        let seed = rng.u64();
        slot_tasks.push(tokio::spawn(async move {
            crate::shim::slot(soak, vm, s, seed).await
        }));
    }
    let mut epoch = 0u64;
    'life: while !soak.stopping() {
        epoch += 1;
        let Some((mut rt, agent)) = register(&soak, &vm, &listeners, epoch, slots).await else {
            // Registration failed (already counted): try again shortly.
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        // Live: probes, and now and then a fault the VM survives.
        loop {
            let life = Instant::now() + Duration::from_millis(8000 + rng.below(17000));
            while Instant::now() < life && !soak.stopping() {
                tokio::time::sleep(Duration::from_millis(500 + rng.below(2000))).await;
                if rng.pct(10) {
                    // A duplicate RegisterVM is refused; the VM is unharmed.
                    let r = call_fresh(&soak, Command::RegisterVm, &register_req(&vm, 1)).await;
                    soak.stats.negatives.add(1);
                    soak.reply(
                        &format!("{}: duplicate RegisterVM", vm.cid),
                        &r,
                        false,
                        false,
                    );
                }
                probe(&soak, &vm, &mut rt, epoch, &mut rng).await;
            }
            if soak.stopping() {
                break;
            }
            let fault = match rng.below(6) {
                0 => Fault::Late,
                1 => Fault::Error,
                2 => Fault::CloseCtl,
                3 => Fault::CloseIo,
                4 => Fault::GarbageCtl,
                _ => Fault::GarbageIo,
            };
            match fault {
                Fault::Late | Fault::Error => {
                    staged_reply(&soak, &vm, &mut rt, fault, &mut rng).await
                }
                _ => {
                    kill(&soak, &vm, &mut rt, &agent, fault).await;
                    continue 'life;
                }
            }
        }
        // Shut down: the slots finish their sessions, the VM powers off
        // and is unregistered.
        for t in slot_tasks.drain(..) {
            let _ = t.await;
        }
        vm.dying.store(true, Ordering::SeqCst);
        agent.power_off();
        let r = rt
            .call(Command::UnregisterVm, &json!({ "containerId": vm.cid }))
            .await;
        soak.reply(
            &format!("{}: UnregisterVM at the end", vm.cid),
            &r,
            true,
            false,
        );
        vm.epoch.send_replace(0);
        return;
    }
    for t in slot_tasks {
        let _ = t.await;
    }
}

fn register_req(vm: &VmState, tokens: usize) -> serde_json::Value {
    json!({
        "containerId": vm.cid,
        "ctlSerial": vm.ctl_path,
        "ioSerial": vm.io_path,
        "numIOStreams": tokens,
    })
}

/// RegisterVM with a fresh agent epoch; hands the tokens to the slots.
async fn register(
    soak: &Arc<Soak>,
    vm: &Arc<VmState>,
    l: &Listeners,
    epoch: u64,
    slots: usize,
) -> Option<(Rt, AgentCtl)> {
    let mut rt = match Rt::connect(&soak.socket).await {
        Ok(rt) => rt,
        Err(e) => {
            soak.check(false, || e);
            return None;
        }
    };
    let req = register_req(vm, slots);
    let (r, a) = tokio::join!(
        rt.call(Command::RegisterVm, &req),
        tokio::time::timeout(
            Duration::from_secs(20),
            agent::accept(l, soak.clone(), vm.clone(), epoch)
        )
    );
    soak.stats.registrations.add(1);
    soak.reply(&format!("{}: RegisterVM", vm.cid), &r, true, false);
    let agent = match a {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            soak.check(false, || format!("{}: agent: {e}", vm.cid));
            return None;
        }
        Err(_) => {
            soak.check(false, || {
                format!("{}: the daemon did not dial the agent", vm.cid)
            });
            return None;
        }
    };
    let Ok(Ok(payload)) = r else {
        agent.power_off();
        return None;
    };
    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
    let tokens: Vec<String> = v["io"]["tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    soak.check(
        tokens.len() == slots && v["io"]["URL"] == soak.url.as_str(),
        || {
            format!(
                "{}: RegisterVM response {v}: want {slots} tokens and URL {}",
                vm.cid, soak.url
            )
        },
    );
    soak.check(
        tokens.iter().all(|t| !t.is_empty())
            && tokens
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                == tokens.len(),
        || format!("{}: RegisterVM tokens are not distinct: {tokens:?}", vm.cid),
    );
    {
        let mut slots_t = vm.tokens.lock().expect("tokens");
        for (i, t) in slots_t.iter_mut().enumerate() {
            *t = tokens.get(i).cloned();
        }
    }
    vm.dying.store(false, Ordering::SeqCst);
    vm.epoch.send_replace(epoch);
    Some((rt, agent))
}

/// A Hyper the agent echoes (`pscontainer` with a unique marker), or a
/// `ping`, or AttachVM on a fresh connection.
async fn probe(soak: &Arc<Soak>, vm: &Arc<VmState>, rt: &mut Rt, epoch: u64, rng: &mut Rng) {
    let _g = vm.gate.read().await;
    if rng.pct(20) {
        let r = rt
            .call(
                Command::Hyper,
                &json!({ "hyperName": "ping", "tokens": [] }),
            )
            .await;
        soak.reply(
            &format!("{}: Hyper ping", vm.cid),
            &r,
            true,
            vm.excused(epoch),
        );
        return;
    }
    if rng.pct(15) {
        // A runtime attaching without tokens, then asking the agent.
        let r = async {
            let mut c = Rt::connect(&soak.socket).await?;
            let a = c
                .call(Command::AttachVm, &json!({ "containerId": vm.cid }))
                .await?;
            if let Err(m) = a {
                return Ok(Err(m));
            }
            c.call(
                Command::Hyper,
                &json!({ "hyperName": "ping", "tokens": [] }),
            )
            .await
        }
        .await;
        soak.reply(
            &format!("{}: AttachVM + Hyper ping", vm.cid),
            &r,
            true,
            vm.excused(epoch),
        );
        return;
    }
    let marker = format!("probe-{}", rng.u64());
    let data = json!({ "container": marker, "format": "json" });
    let r = rt
        .call(
            Command::Hyper,
            &json!({ "hyperName": "pscontainer", "tokens": [], "data": data }),
        )
        .await;
    let excused = vm.excused(epoch);
    soak.reply(&format!("{}: Hyper pscontainer", vm.cid), &r, true, excused);
    if let Ok(Ok(p)) = &r {
        let got: serde_json::Value = serde_json::from_slice(p).unwrap_or_default();
        soak.check(got == data || excused, || {
            format!(
                "{}: Hyper reply {got} is not the agent's answer to {data}",
                vm.cid
            )
        });
    }
}

/// An agent answering later than --ctl-timeout, or with ERROR: the
/// command fails, and the next one gets its own reply.
async fn staged_reply(
    soak: &Arc<Soak>,
    vm: &Arc<VmState>,
    rt: &mut Rt,
    fault: Fault,
    rng: &mut Rng,
) {
    let _g = vm.gate.write().await;
    let n = rng.u64();
    let (marker, counter) = match fault {
        Fault::Late => (format!("late-{n}"), &soak.stats.fault_late),
        _ => (format!("err-{n}"), &soak.stats.fault_error),
    };
    counter.add(1);
    let t = Instant::now();
    let r = rt
        .call(
            Command::Hyper,
            &json!({ "hyperName": "pscontainer", "tokens": [], "data": { "container": marker } }),
        )
        .await;
    soak.reply(
        &format!("{}: Hyper to a {fault:?} agent", vm.cid),
        &r,
        false,
        false,
    );
    if let Ok(Err(msg)) = &r {
        match fault {
            Fault::Late => soak.check(t.elapsed() >= crate::CTL_TIMEOUT / 2, || {
                format!(
                    "{}: a late reply failed after {:?} only: {msg}",
                    vm.cid,
                    t.elapsed()
                )
            }),
            _ => soak.check(msg.contains(&format!("soak-agent-error {n}")), || {
                format!(
                    "{}: the agent's ERROR is not in the response: {msg:?}",
                    vm.cid
                )
            }),
        }
    }
    // The next command gets its own reply, not the late one.
    let data = json!({ "container": format!("after-{n}") });
    let r = rt
        .call(
            Command::Hyper,
            &json!({ "hyperName": "pscontainer", "tokens": [], "data": data }),
        )
        .await;
    soak.reply(
        &format!("{}: Hyper after a {fault:?} reply", vm.cid),
        &r,
        true,
        false,
    );
    if let Ok(Ok(p)) = &r {
        let got: serde_json::Value = serde_json::from_slice(p).unwrap_or_default();
        soak.check(got == data, || {
            format!(
                "{}: after a {fault:?} reply, the reply {got} is not the answer to {data}",
                vm.cid
            )
        });
    }
}

/// A fault the VM does not survive: it must be torn down (Hyper and
/// AttachVM fail), then it is unregistered.
async fn kill(soak: &Arc<Soak>, vm: &Arc<VmState>, rt: &mut Rt, agent: &AgentCtl, fault: Fault) {
    let _g = vm.gate.write().await;
    vm.dying.store(true, Ordering::SeqCst);
    match fault {
        Fault::CloseCtl => {
            soak.stats.fault_close_ctl.add(1);
            agent.close_ctl();
        }
        Fault::CloseIo => {
            soak.stats.fault_close_io.add(1);
            agent.close_io();
        }
        Fault::GarbageCtl => {
            soak.stats.fault_garbage_ctl.add(1);
            agent.garbage_ctl();
        }
        _ => {
            soak.stats.fault_garbage_io.add(1);
            agent.garbage_io().await;
        }
    }
    // Torn down within a few seconds: a Hyper fails.
    let t = Instant::now();
    let mut down = false;
    while t.elapsed() < Duration::from_secs(5) {
        let r = rt
            .call(
                Command::Hyper,
                &json!({ "hyperName": "ping", "tokens": [] }),
            )
            .await;
        soak.stats.commands.add(1);
        if !matches!(r, Ok(Ok(_))) {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    soak.check(down, || {
        format!("{}: still answering 5 s after {fault:?}", vm.cid)
    });
    let r = call_fresh(
        soak,
        Command::AttachVm,
        &json!({ "containerId": vm.cid, "numIOStreams": 1 }),
    )
    .await;
    soak.reply(
        &format!("{}: AttachVM after {fault:?}", vm.cid),
        &r,
        false,
        false,
    );
    agent.power_off();
    let r = rt
        .call(Command::UnregisterVm, &json!({ "containerId": vm.cid }))
        .await;
    soak.reply(
        &format!("{}: UnregisterVM after {fault:?}", vm.cid),
        &r,
        true,
        false,
    );
    vm.epoch.send_replace(0);
}

/// One command on a fresh connection.
pub async fn call_fresh(
    soak: &Soak,
    cmd: Command,
    p: &serde_json::Value,
) -> Result<wire::Reply, String> {
    let mut c = Rt::connect(&soak.socket).await?;
    c.call(cmd, p).await
}

/// Commands the rules refuse, on fresh connections, until `deadline`.
pub async fn negatives(soak: Arc<Soak>, seed: u64, deadline: Instant) {
    let mut rng = Rng::new(seed);
    while Instant::now() < deadline && !soak.stopping() {
        tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
        soak.stats.negatives.add(1);
        let nobody = format!("soak-nobody-{}", rng.u64());
        let (what, cmd, p) = match rng.below(6) {
            0 => (
                "UnregisterVM of an unknown VM",
                Command::UnregisterVm,
                json!({ "containerId": nobody }),
            ),
            1 => (
                "AttachVM of an unknown VM",
                Command::AttachVm,
                json!({ "containerId": nobody }),
            ),
            2 => (
                "ConnectShim with an unknown token",
                Command::ConnectShim,
                json!({ "token": nobody }),
            ),
            3 => (
                "Hyper on an unattached connection",
                Command::Hyper,
                json!({ "hyperName": "ping", "tokens": [] }),
            ),
            4 => (
                "Signal from a non-shim",
                Command::Signal,
                json!({ "signalNumber": 15 }),
            ),
            _ => (
                "DisconnectShim from a non-shim",
                Command::DisconnectShim,
                json!({}),
            ),
        };
        let r = call_fresh(&soak, cmd, &p).await;
        soak.reply(what, &r, false, false);
    }
}
