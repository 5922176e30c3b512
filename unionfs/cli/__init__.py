"""The commands: argument parsing and dispatch (:mod:`unionfs.cli.main`) and the command
bodies for images and the store, containers and volumes. The only package that prints
for the user.
"""
