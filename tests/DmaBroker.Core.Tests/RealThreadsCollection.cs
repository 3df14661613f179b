namespace DmaBroker.Core.Tests;

/// <summary>
/// Tests that run many real threads against each other (barriers, busy DMA writers). They run
/// alone, after the parallel tests: on a 2-core machine, two of them side by side, or one beside
/// the model-based tests, spend most of their time waiting for a core rather than racing.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class RealThreadsCollection
{
    public const string Name = "real threads";
}
