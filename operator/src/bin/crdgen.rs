//! `crdgen`: prints the `StreamPipeline` CustomResourceDefinition as YAML
//! (`cargo run -p streampipe-operator --bin crdgen > crds/streampipeline.yaml`);
//! with `--cel`, the rendering with CEL validation rules for Kubernetes
//! ≥ 1.25 (`> crds/cel/streampipeline.yaml`).

fn main() {
    if std::env::args().any(|a| a == "--cel") {
        print!("{}", streampipe_operator::cel::crd_yaml_with_rules());
    } else {
        print!("{}", streampipe_operator::crd::crd_yaml());
    }
}
