//! The worker: claims sessions through leases, keeps their agent processes warm, runs their
//! turns one at a time and writes every event to Postgres. (Being built: the pieces below
//! are in place; the session actor and the queue consumers come next.)

pub mod writer;
