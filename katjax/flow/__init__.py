"""SeamlessFlow (DESIGN.md section 6): trajectory manager, scheduler, learner and the async loop."""
