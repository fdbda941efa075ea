//! `install` and `uninstall`: the manifests applied server-side (field manager `zmeshctl`, as
//! `kubectl apply --server-side --force-conflicts` does), and deleted in reverse order.

use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};

use crate::error::{Error, is_not_found};
use crate::manifests::{self, Object};

/// The field manager of every apply.
pub const FIELD_MANAGER: &str = "zmeshctl";

fn api(client: &Client, o: &Object) -> Api<DynamicObject> {
    match (&o.object.metadata.namespace, o.namespaced) {
        (Some(ns), true) => Api::namespaced_with(client.clone(), ns, &o.resource),
        _ => Api::all_with(client.clone(), &o.resource),
    }
}

/// Applies `objects` in order. Checks first that the cluster serves every kind zmesh does
/// not bring itself (the Gateway API's GatewayClass), so a missing prerequisite changes
/// nothing.
pub async fn install(client: &Client, objects: &[Object]) -> Result<(), Error> {
    if let Some(gc) = objects.iter().find(|o| o.resource.kind == "GatewayClass") {
        let probe = Api::<DynamicObject>::all_with(client.clone(), &gc.resource);
        match probe.list(&ListParams::default().limit(1)).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => return Err(Error::GatewayApiMissing),
            Err(e) => return Err(Error::api("listing GatewayClasses")(e)),
        }
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let progress = crate::progress::Progress::start("applying");
    for o in objects {
        progress.set(&format!("applying {}", o.describe()));
        api(client, o)
            .patch(o.name(), &params, &Patch::Apply(&o.object))
            .await
            .map_err(Error::api(format!("applying {}", o.describe())))?;
        progress.suspend(|| println!("applied {}", o.describe()));
    }
    progress.finish();
    Ok(())
}

/// What `uninstall` leaves unless purging: the namespace (it holds the mesh CA's `cacerts`
/// Secret, which the operator created) and the AuthorizationPolicy CRD (deleting it deletes
/// every AuthorizationPolicy in the cluster).
pub fn kept_without_purge(o: &Object) -> bool {
    matches!(
        o.resource.kind.as_str(),
        "Namespace" | "CustomResourceDefinition"
    )
}

/// Deletes `objects` in reverse order (absent ones are skipped); with `dry_run`, only says
/// what it would delete.
pub async fn uninstall(
    client: Option<&Client>,
    objects: &[Object],
    purge: bool,
) -> Result<(), Error> {
    for o in objects.iter().rev() {
        if !purge && kept_without_purge(o) {
            println!("kept {} (--purge deletes it)", o.describe());
            continue;
        }
        let Some(client) = client else {
            println!("would delete {}", o.describe());
            continue;
        };
        match api(client, o)
            .delete(o.name(), &DeleteParams::background())
            .await
        {
            Ok(_) => println!("deleted {}", o.describe()),
            Err(e) if is_not_found(&e) => println!("absent {}", o.describe()),
            Err(e) => return Err(Error::api(format!("deleting {}", o.describe()))(e)),
        }
    }
    if client.is_some() {
        println!(
            "note: node agents leave the zmesh-cni plugin chained in each node's CNI config; \
             run `zmesh-cni-agent --uninstall` on each node to remove it (manifests/README.md)"
        );
    }
    Ok(())
}

/// The objects `install` creates with `values`.
pub fn objects(values: &manifests::Values) -> Result<(String, Vec<Object>), Error> {
    let yaml = manifests::render(values)?;
    let objects = manifests::objects(&yaml)?;
    Ok((yaml, objects))
}
