# The two quick-start commands (see README.md). Both install what they need on first use.
.PHONY: demo test install crds fmt

## Runs the main job: a local control plane, the operator reconciling an example ChatService.
demo:
	bash tests/demo.sh

## Runs every test against the real rig (what CI runs).
test:
	bash tests/run-tests.sh

## Builds and caches the rig's servers only.
install:
	bash tests/rig/install.sh

## Regenerates everything generated (the CRD YAML).
crds:
	cargo run -q -p chat-operator --bin crdgen > crds/chatservice.yaml

fmt:
	cargo fmt --all
