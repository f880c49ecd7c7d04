//! The ways a container runtime asks for an endpoint.

pub mod cni;

pub mod docker;
