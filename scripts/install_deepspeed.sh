#!/usr/bin/env bash
# Placeholder until the DeepSpeed engine lands: installs nothing.
exit 0
