//! The engine thread: it owns the [`Engine`], takes commands from the HTTP
//! handlers over a channel, and steps while any request is in flight,
//! sending each request's tokens and its end to that request's own channel.
//! When idle it blocks on the command channel (no polling).
//!
//! A request whose receiver is gone (the client disconnected, its response
//! stream was dropped) is aborted as soon as a send to it fails; the
//! handlers also send [`Command::Abort`] when they drop a request that has
//! produced nothing yet, so its KV is freed without waiting for a token.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use vpod_engine::{Engine, EngineError, FinishReason, NewRequest, RequestId, RequestOutput};

use super::metrics::Metrics;

/// What a handler asks of the engine thread.
#[derive(Debug)]
pub enum Command {
    /// Queue a request; the reply carries its id or why it was refused.
    Add {
        request: NewRequest,
        events: mpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<Result<RequestId, EngineError>>,
    },
    /// End a request and free its KV (unknown or finished ids are ignored).
    Abort(RequestId),
    /// Abort everything in flight (the shutdown grace period ran out).
    AbortAll,
    /// Finish what is in flight, then leave the loop.
    Stop,
}

/// What a request's channel receives.
#[derive(Debug, Clone)]
pub enum Event {
    Token {
        token: u32,
        logprob: Option<f32>,
    },
    /// The last event of a request.
    Finished(RequestOutput),
}

/// Runs the engine until [`Command::Stop`] (and nothing left in flight) or
/// until every command sender is gone.
pub fn run(mut engine: Engine, commands: Receiver<Command>, metrics: Arc<Metrics>) {
    let mut streams: HashMap<RequestId, mpsc::UnboundedSender<Event>> = HashMap::new();
    let mut stopping = false;
    loop {
        // Take every command that is waiting; block only when there is no work.
        loop {
            let cmd = if engine.has_unfinished() {
                match commands.try_recv() {
                    Ok(c) => c,
                    Err(_) => break,
                }
            } else if stopping {
                return;
            } else {
                // Wake now and then to keep the gauges fresh while idle.
                match commands.recv_timeout(Duration::from_secs(1)) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => {
                        metrics.set_engine(engine.stats());
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            match cmd {
                Command::Add {
                    request,
                    events,
                    reply,
                } => {
                    let prompt = request.prompt.len();
                    let r = engine.add_request(request);
                    if let Ok(id) = &r {
                        streams.insert(*id, events);
                        metrics.add_prompt_tokens(prompt);
                    }
                    // A handler that gave up before the reply drops it; abort then.
                    if let Err(Ok(id)) = reply.send(r) {
                        engine.abort(id);
                        streams.remove(&id);
                    }
                }
                Command::Abort(id) => {
                    if let Some(out) = engine.abort(id) {
                        metrics.set_engine(engine.stats());
                        metrics.finished(&out);
                    }
                    streams.remove(&id);
                }
                Command::AbortAll => {
                    for f in engine.abort_all() {
                        metrics.finished(&f.output);
                        if let Some(tx) = streams.remove(&f.id) {
                            let _ = tx.send(Event::Finished(f.output));
                        }
                    }
                }
                Command::Stop => stopping = true,
            }
        }
        if !engine.has_unfinished() {
            metrics.set_engine(engine.stats());
            continue;
        }
        match engine.step() {
            Ok(out) => {
                // The gauges first: a client that gets its last token may
                // read /metrics at once, and the step has already freed its KV.
                metrics.set_engine(engine.stats());
                let mut gone = vec![];
                for t in &out.tokens {
                    metrics.add_generated_tokens(1);
                    let event = Event::Token {
                        token: t.token,
                        logprob: t.logprob,
                    };
                    if streams.get(&t.id).is_none_or(|tx| tx.send(event).is_err()) {
                        gone.push(t.id);
                    }
                }
                for f in out.finished {
                    metrics.finished(&f.output);
                    if let Some(tx) = streams.remove(&f.id) {
                        let _ = tx.send(Event::Finished(f.output));
                    }
                }
                // Clients that went away: free their KV now, not at max_tokens.
                for id in gone {
                    if let Some(out) = engine.abort(id) {
                        metrics.finished(&out);
                    }
                    streams.remove(&id);
                }
            }
            Err(e) => {
                // The step failed as a whole: end everything in flight with
                // the error rather than retrying the same batch forever.
                eprintln!("error: engine step failed: {e}");
                for f in engine.abort_all() {
                    let mut output = f.output;
                    output.finish_reason = FinishReason::Error;
                    output.error = Some(format!("the engine step failed: {e}"));
                    metrics.finished(&output);
                    if let Some(tx) = streams.remove(&f.id) {
                        let _ = tx.send(Event::Finished(output));
                    }
                }
            }
        }
        metrics.set_engine(engine.stats());
    }
}

/// The handlers' side of the engine thread.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    commands: Sender<Command>,
}

impl EngineHandle {
    pub fn new(commands: Sender<Command>) -> Self {
        Self { commands }
    }

    /// Queues `request`; its events arrive on the returned receiver.
    pub async fn add(
        &self,
        request: NewRequest,
    ) -> Result<(RequestId, mpsc::UnboundedReceiver<Event>), AddError> {
        let (events, rx) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Add {
                request,
                events,
                reply,
            })
            .map_err(|_| AddError::Stopped)?;
        match answer.await {
            Ok(Ok(id)) => Ok((id, rx)),
            Ok(Err(e)) => Err(AddError::Refused(e)),
            Err(_) => Err(AddError::Stopped),
        }
    }

    pub fn send(&self, cmd: Command) {
        // The engine thread only ends at shutdown; nothing is left to do then.
        let _ = self.commands.send(cmd);
    }
}

/// Why a request could not be queued.
#[derive(Debug)]
pub enum AddError {
    Refused(EngineError),
    /// The engine thread has stopped.
    Stopped,
}
