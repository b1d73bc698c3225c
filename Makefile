# Packaging targets; the work is done by packaging/build.sh (see README.md and docs/operations.md).
.PHONY: packages deb rpm

packages:
	packaging/build.sh packages

deb:
	packaging/build.sh deb

rpm:
	packaging/build.sh rpm
