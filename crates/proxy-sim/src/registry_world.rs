//! Runtimes and shims against the registry: every command in random order,
//! valid and not, shims that drop, close slowly, reconnect and disconnect,
//! agents that start and end processes and VMs that go. An independent
//! model of what each token's process and claim must be is kept alongside
//! and compared after every step, with the registry's own invariants.

use std::collections::HashMap;

use proxy_proto::payload::{AttachVm, Hyper, RegisterVm, Signal, UnregisterVm};
use proxy_server::registry::{
    Claim, ConnId, ProcessState, ProxyError, Registry, SignalPlan, TokenLimits, VmId, VmPhase,
};

use crate::rng::Rng;

/// What one run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Commands applied.
    pub commands: u64,
    /// Of them, refused by the rules.
    pub refused: u64,
}

/// A simulated client connection.
#[derive(Debug)]
struct Conn {
    id: ConnId,
    /// The VM it registered or attached.
    vm: Option<VmId>,
    /// The token it holds as a shim, and whether its connection is closing.
    shim: Option<(String, bool)>,
}

/// What the model says a token's process is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Process {
    None,
    Starting { container: Option<String> },
    Started { container: Option<String> },
    Exited,
    KilledBeforeStart,
}

impl Process {
    fn matches(&self, p: &ProcessState) -> bool {
        match (self, p) {
            (Process::None, ProcessState::None)
            | (Process::Starting { .. }, ProcessState::Starting)
            | (Process::Exited, ProcessState::Exited)
            | (Process::KilledBeforeStart, ProcessState::KilledBeforeStart) => true,
            (Process::Started { container: a }, ProcessState::Started { container: b }) => a == b,
            _ => false,
        }
    }
}

const NAMES: [&str; 4] = ["c0", "c1", "c2", "c3"];

/// Run one seeded schedule of `steps` steps.
pub fn run(seed: u64, steps: usize) -> Result<Stats, String> {
    let mut rng = Rng::new(seed);
    let limits = TokenLimits {
        per_vm: 4 + rng.below(8) as u32,
        total: 8 + rng.below(16) as u32,
    };
    let mut r = Registry::with_limits(limits);
    let mut conns: Vec<Conn> = (1..=6)
        .map(|i| Conn {
            id: ConnId(i),
            vm: None,
            shim: None,
        })
        .collect();
    let mut next_conn = 7;
    let mut next_token = 0u64;
    // Every token ever handed out, and some never handed out.
    let mut seen: Vec<String> = vec!["bogus".into(), String::new()];
    let mut process: HashMap<String, Process> = HashMap::new();
    // RegisterVMs being brought up.
    let mut reserved: Vec<VmId> = Vec::new();
    let mut vms: Vec<VmId> = Vec::new();
    let mut stats = Stats::default();
    for step in 0..steps {
        let ci = rng.index(conns.len());
        let action = rng.below(20);
        let what: String;
        match action {
            0 | 1 => {
                let req = RegisterVm {
                    container_id: rng.pick(&NAMES).copied().unwrap_or("c0").into(),
                    ctl_serial: if rng.chance(5) {
                        String::new()
                    } else {
                        "/c".into()
                    },
                    io_serial: "/i".into(),
                    num_io_streams: if rng.chance(3) {
                        5000
                    } else {
                        rng.below(5) as u32
                    },
                    ..Default::default()
                };
                what = format!("RegisterVM {:?} x{}", req.container_id, req.num_io_streams);
                let taken = NAMES.iter().any(|n| {
                    *n == req.container_id && r.vm_count() > 0 && registered(&r, &vms, &reserved, n)
                });
                stats.commands += 1;
                match r.register_vm(&req, || {
                    next_token += 1;
                    format!("t{next_token}")
                }) {
                    Ok((vm, toks)) => {
                        if taken {
                            return Err(format!(
                                "step {step}: {what}: a taken container id was registered again"
                            ));
                        }
                        if toks.len() != req.num_io_streams as usize {
                            return Err(format!("step {step}: {what}: got {} tokens", toks.len()));
                        }
                        for t in toks {
                            process.insert(t.token.clone(), Process::None);
                            seen.push(t.token);
                        }
                        conns[ci].vm = Some(vm);
                        reserved.push(vm);
                    }
                    Err(_) => stats.refused += 1,
                }
            }
            2 => {
                // A bring-up ends: READY, or the agent never came.
                let Some(i) = (!reserved.is_empty()).then(|| rng.index(reserved.len())) else {
                    continue;
                };
                let vm = reserved.swap_remove(i);
                if rng.chance(80) {
                    what = format!("READY on {vm:?}");
                    if r.vm_ready(vm, ()).is_err() {
                        return Err(format!(
                            "step {step}: {what}: a reserved VM could not be made ready"
                        ));
                    }
                    vms.push(vm);
                } else {
                    what = format!("bring-up of {vm:?} failed");
                    for t in r.remove_vm(vm) {
                        process.remove(&t);
                    }
                }
            }
            3 | 4 => {
                let req = AttachVm {
                    container_id: rng.pick(&NAMES).copied().unwrap_or("c0").into(),
                    num_io_streams: if rng.chance(3) {
                        9000
                    } else {
                        rng.below(4) as u32
                    },
                };
                what = format!("AttachVM {:?} x{}", req.container_id, req.num_io_streams);
                stats.commands += 1;
                match r.attach_vm(&req, || {
                    next_token += 1;
                    format!("t{next_token}")
                }) {
                    Ok((vm, toks)) => {
                        if r.vm_phase(vm) != Some(&VmPhase::Live) {
                            return Err(format!(
                                "step {step}: {what}: attached a VM in phase {:?}",
                                r.vm_phase(vm)
                            ));
                        }
                        for t in toks {
                            process.insert(t.token.clone(), Process::None);
                            seen.push(t.token);
                        }
                        conns[ci].vm = Some(vm);
                    }
                    Err(_) => stats.refused += 1,
                }
            }
            5 => {
                let req = UnregisterVm {
                    container_id: rng.pick(&NAMES).copied().unwrap_or("c0").into(),
                };
                what = format!("UnregisterVM {:?}", req.container_id);
                stats.commands += 1;
                match r.unregister_vm(&req) {
                    Ok(vm) => {
                        if conns[ci].vm == Some(vm) {
                            conns[ci].vm = None;
                        }
                    }
                    Err(_) => stats.refused += 1,
                }
            }
            6..=8 => {
                let token = rng.pick(&seen).cloned().unwrap_or_default();
                let (name, data) = match rng.below(7) {
                    0 | 1 => (
                        "newcontainer",
                        format!(r#"{{"id":"ctr{step}","process":{{"terminal":false}}}}"#),
                    ),
                    2 | 3 => ("execcmd", r#"{"container":"ctr","process":{}}"#.to_string()),
                    4 => ("newcontainer", r#"{"process":{"stdio":9}}"#.to_string()),
                    5 => ("ping", "{}".to_string()),
                    _ => ("bogus", "[]".to_string()),
                };
                let tokens = match rng.below(5) {
                    0 => vec![],
                    1 => vec![token.clone(), token.clone()],
                    _ => vec![token.clone()],
                };
                what = format!("Hyper {name} {tokens:?}");
                let req =
                    Hyper::new(name, tokens.clone(), Some(&data)).map_err(|e| e.to_string())?;
                stats.commands += 1;
                let before = r.token(&token).map(|t| (t.vm, t.process.clone()));
                match r.plan_hyper(conns[ci].vm, &req) {
                    Ok(plan) => {
                        if let Some((t, io_base)) = &plan.session {
                            let Some((vm, p)) = before else {
                                return Err(format!(
                                    "step {step}: {what}: planned on an unknown token"
                                ));
                            };
                            if Some(vm) != conns[ci].vm
                                || p != ProcessState::None
                                || tokens.len() != 1
                            {
                                return Err(format!("step {step}: {what}: planned on a token of {vm:?} in state {p:?}"));
                            }
                            if r.token(t).map(|e| e.io_base) != Some(*io_base) {
                                return Err(format!(
                                    "step {step}: {what}: the plan's io base is not the token's"
                                ));
                            }
                            process.insert(
                                t.clone(),
                                Process::Starting {
                                    container: plan.container_id.clone(),
                                },
                            );
                        }
                    }
                    Err(e) => {
                        stats.refused += 1;
                        if tokens.len() == 1 && name != "ping" && name != "bogus" {
                            if let (Some((vm, ProcessState::None)), Some(cvm)) =
                                (&before, conns[ci].vm)
                            {
                                if *vm == cvm
                                    && r.vm_phase(cvm) == Some(&VmPhase::Live)
                                    && !data.contains("stdio")
                                {
                                    return Err(format!(
                                        "step {step}: {what}: refused a valid start: {e}"
                                    ));
                                }
                            }
                        }
                    }
                }
            }
            9 => {
                // The agent answers a start: ACK or ERROR.
                let starting: Vec<String> = process
                    .iter()
                    .filter(|(_, p)| matches!(p, Process::Starting { .. }))
                    .map(|(t, _)| t.clone())
                    .collect();
                let Some(t) = rng.pick(&starting).cloned() else {
                    continue;
                };
                let Some(Process::Starting { container }) = process.get(&t).cloned() else {
                    continue;
                };
                if rng.chance(75) {
                    what = format!("started {t}");
                    r.process_started(&t, container.clone());
                    process.insert(t, Process::Started { container });
                } else {
                    what = format!("start of {t} failed");
                    r.process_start_failed(&t);
                    process.insert(t, Process::None);
                }
            }
            10 => {
                let started: Vec<String> = process
                    .iter()
                    .filter(|(_, p)| matches!(p, Process::Started { .. }))
                    .map(|(t, _)| t.clone())
                    .collect();
                let Some(t) = rng.pick(&started).cloned() else {
                    continue;
                };
                what = format!("exit of {t}");
                r.process_exited(&t);
                process.insert(t, Process::Exited);
            }
            11..=13 => {
                if conns[ci].shim.is_some() {
                    continue; // the connection's own rules refuse a second ConnectShim
                }
                let t = rng.pick(&seen).cloned().unwrap_or_default();
                what = format!("ConnectShim {t} from {:?}", conns[ci].id);
                stats.commands += 1;
                let claim = r.token(&t).map(|e| e.claim);
                match r.connect_shim(conns[ci].id, &t) {
                    Ok(_) => {
                        if matches!(claim, Some(Claim::Held(_) | Claim::Releasing(_))) {
                            return Err(format!(
                                "step {step}: {what}: claimed a token held by {claim:?}"
                            ));
                        }
                        conns[ci].shim = Some((t, false));
                    }
                    Err(e) => {
                        stats.refused += 1;
                        if claim == Some(Claim::Free) {
                            return Err(format!(
                                "step {step}: {what}: a free token was refused: {e}"
                            ));
                        }
                    }
                }
            }
            14 => {
                // The shim's connection drops: it closes, and later lets go.
                let Some((t, closing)) = conns[ci].shim.clone() else {
                    continue;
                };
                let id = conns[ci].id;
                if !closing {
                    what = format!("{id:?} closing");
                    r.shim_closing(id, &t);
                    conns[ci].shim = Some((t, true));
                } else {
                    what = format!("{id:?} gone");
                    r.shim_gone(id, &t);
                    conns[ci] = Conn {
                        id: ConnId(next_conn),
                        vm: None,
                        shim: None,
                    };
                    next_conn += 1;
                }
            }
            15 => {
                let Some((t, false)) = conns[ci].shim.clone() else {
                    continue;
                };
                what = format!("DisconnectShim {t}");
                stats.commands += 1;
                if r.disconnect_shim(conns[ci].id, &t).is_some() {
                    process.remove(&t);
                }
                conns[ci] = Conn {
                    id: ConnId(next_conn),
                    vm: None,
                    shim: None,
                };
                next_conn += 1;
            }
            16 | 17 => {
                let Some((t, false)) = conns[ci].shim.clone() else {
                    continue;
                };
                let n = match rng.below(8) {
                    0 => 9,
                    1 => 15,
                    2 => 28,
                    3 => 31,
                    4 => -1,
                    _ => rng.below(31) as i64,
                };
                let (columns, rows) = match rng.below(4) {
                    0 => (80, 24),
                    1 => (0, 24),
                    2 => (70000, 1),
                    _ => (0, 0),
                };
                let sig = Signal {
                    signal_number: n,
                    columns,
                    rows,
                };
                what = format!("Signal {n} {columns}x{rows} on {t}");
                stats.commands += 1;
                let valid = (0..31).contains(&n)
                    && if n == 28 {
                        (1..=65535).contains(&columns) && (1..=65535).contains(&rows)
                    } else {
                        columns == 0 && rows == 0
                    };
                let model = process.get(&t).cloned();
                let got = r.plan_signal(&t, &sig);
                check_signal(&got, valid, n, model.as_ref())
                    .map_err(|e| format!("step {step}: {what}: {e}"))?;
                if matches!(got, Ok(SignalPlan::ExitedBeforeStart)) {
                    process.insert(t, Process::KilledBeforeStart);
                }
                if got.is_err() {
                    stats.refused += 1;
                }
            }
            _ => {
                // An agent goes.
                let Some(vm) = rng.pick(&vms).copied() else {
                    continue;
                };
                what = format!("agent of {vm:?} gone");
                let gone = r.vm_gone(vm, "the agent closed the io channel");
                if r.vm_handle(vm).is_some() {
                    return Err(format!("step {step}: {what}: a gone VM kept its handle"));
                }
                for t in gone.tokens {
                    process.remove(&t);
                }
            }
        }
        r.check_invariants()
            .map_err(|e| format!("step {step} ({what}): {e}"))?;
        check_model(&r, &conns, &process).map_err(|e| format!("step {step} ({what}): {e}"))?;
    }
    Ok(stats)
}

/// Whether a container id is taken: registered (or being brought up) and
/// not unregistered.
fn registered(r: &Registry, vms: &[VmId], reserved: &[VmId], name: &str) -> bool {
    vms.iter()
        .chain(reserved)
        .any(|vm| r.vm_container_id(*vm) == Some(name) && r.vm_registered(*vm))
}

fn check_signal(
    got: &Result<SignalPlan, ProxyError>,
    valid: bool,
    n: i64,
    model: Option<&Process>,
) -> Result<(), String> {
    let Some(model) = model else {
        return match got {
            Err(_) => Ok(()),
            Ok(p) => Err(format!("a signal for a freed token was planned: {p:?}")),
        };
    };
    if !valid {
        return match got {
            Err(_) => Ok(()),
            Ok(p) => Err(format!("an invalid signal was planned: {p:?}")),
        };
    }
    let ok = match (model, got) {
        (Process::None | Process::KilledBeforeStart, Ok(SignalPlan::ExitedBeforeStart)) => {
            n == 9 || n == 15
        }
        (
            Process::None | Process::Starting { .. } | Process::KilledBeforeStart,
            Ok(SignalPlan::WaitForStart),
        ) => !(matches!(model, Process::None | Process::KilledBeforeStart) && (n == 9 || n == 15)),
        (Process::Started { .. } | Process::Exited, Ok(SignalPlan::Send { code, .. }))
            if n == 28 =>
        {
            *code == proxy_proto::hyper::ctl::Code::WinSize
        }
        (Process::Started { container: Some(_) }, Ok(SignalPlan::Send { code, .. })) => {
            *code == proxy_proto::hyper::ctl::Code::KillContainer
        }
        (Process::Started { container: None }, Err(ProxyError::NoContainerToSignal(_))) => n != 28,
        (Process::Exited, Err(ProxyError::ProcessExited(_))) => n != 28,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("process {model:?}: planned {got:?}"))
    }
}

fn check_model(
    r: &Registry,
    conns: &[Conn],
    process: &HashMap<String, Process>,
) -> Result<(), String> {
    for (t, e) in r.tokens() {
        let Some(p) = process.get(t) else {
            return Err(format!("token {t} is live; the model freed it"));
        };
        if !p.matches(&e.process) {
            return Err(format!(
                "token {t}: process {:?}, the model says {p:?}",
                e.process
            ));
        }
        if let Some(holder) = e.claim.holder() {
            let c = conns.iter().find(|c| c.id == holder);
            match c.and_then(|c| c.shim.as_ref()) {
                Some((ct, closing)) if ct == t => {
                    let releasing = matches!(e.claim, Claim::Releasing(_));
                    if *closing != releasing {
                        return Err(format!(
                            "token {t}: claim {:?}, its connection closing={closing}",
                            e.claim
                        ));
                    }
                }
                _ => {
                    return Err(format!(
                        "token {t} is held by {holder:?}, which does not hold it"
                    ))
                }
            }
        }
    }
    for c in conns {
        if let Some((t, _)) = &c.shim {
            if let Some(e) = r.token(t) {
                if e.claim.holder() != Some(c.id) {
                    return Err(format!(
                        "{:?} holds {t}; the registry says {:?}",
                        c.id, e.claim
                    ));
                }
            }
        }
    }
    let live = r.tokens().count();
    if live != r.token_count() {
        return Err("token_count disagrees with the tokens".into());
    }
    Ok(())
}
