//! `crdgen`: prints the `StreamPipeline` CustomResourceDefinition as YAML
//! (`cargo run -p streampipe-operator --bin crdgen > crds/streampipeline.yaml`).

fn main() {
    print!("{}", streampipe_operator::crd::crd_yaml());
}
