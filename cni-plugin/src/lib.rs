//! zmesh's chained CNI plugin (`zmesh-cni`) and node agent (`zmesh-cni-agent`). The plugin
//! runs in the host netns for every pod the container runtime creates, decides nothing on its
//! own beyond the namespaces it is told to skip, and asks the node agent to enrol the pod; the
//! agent installs the redirection rules inside the pod's network namespace and hands that
//! namespace to ztunnel (ZDS). See `docs/CNI.md`.

pub mod agent;
pub mod api;
pub mod install;
pub mod plugin;
pub mod rules;
pub mod spec;
