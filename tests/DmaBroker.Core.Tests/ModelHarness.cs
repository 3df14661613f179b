using System.Globalization;

namespace DmaBroker.Core.Tests;

/// <summary>
/// The seeded loop of a model-based test (STYLE practice 9): sequences with seeds 0…N-1, or only
/// the seed an environment variable names, to replay a failure. Each sequence gets a
/// <see cref="ModelRun"/>, whose failures print the seed, how to replay it and the trace. After
/// all of them, every required outcome must have been reached, so that a test cannot pass by
/// exercising nothing.
/// </summary>
internal static class ModelHarness
{
    /// <param name="name">What failed, for the message: "model-based sequence".</param>
    /// <param name="seedVariable">The environment variable that replays one seed.</param>
    /// <param name="sequences">How many seeds to run when none is given.</param>
    /// <param name="requiredOutcomes">"Kind outcome" strings the whole run must reach.</param>
    /// <param name="sequence">Runs one sequence against a broker it hands to <see cref="ModelRun.Use"/>.</param>
    public static async Task RunAsync(string name, string seedVariable, int sequences, IEnumerable<string> requiredOutcomes, Func<ModelRun, Task> sequence)
    {
        var seen = new HashSet<string>();
        var replay = Environment.GetEnvironmentVariable(seedVariable);
        var seeds = replay is null ? Enumerable.Range(0, sequences) : [int.Parse(replay, CultureInfo.InvariantCulture)];

        foreach (var seed in seeds)
        {
            var run = new ModelRun(name, seedVariable, seed, seen);
            await sequence(run);
            // Only once the sequence passed: after a failure, disposing a broken broker could throw and hide the seed and trace.
            foreach (var broker in run.Brokers)
                await broker.DisposeAsync().AsTask().WaitAsync(CoreState.Timeout);
        }

        if (replay is null)
            Assert.Empty(requiredOutcomes.Except(seen));
    }
}

/// <summary>One seeded sequence: its random source, its trace, the outcomes it reached, and its failure message.</summary>
internal sealed class ModelRun(string name, string seedVariable, int seed, HashSet<string> seen)
{
    /// <summary>The outcome of a call the core refused because its session had ended.</summary>
    public const string Unauthenticated = "UNAUTHENTICATED";

    private readonly List<string> _trace = [];
    private readonly List<Broker> _brokers = [];
    private string _where = "";

    public int Seed => seed;

    /// <summary>Every choice of the sequence comes from here, so the seed replays it.</summary>
    public Random Random { get; } = new(seed);

    internal IReadOnlyList<Broker> Brokers => _brokers;

    /// <summary>The broker the sequence runs against, disposed after it passed; <paramref name="where"/> ("on the small topology") goes into the failure message.</summary>
    public Broker Use(Broker broker, string? where = null)
    {
        _brokers.Add(broker);
        if (where is not null)
            _where = " " + where;
        return broker;
    }

    /// <summary>A kind drawn with the given weights.</summary>
    public TKind Pick<TKind>(IReadOnlyList<(TKind Kind, int Weight)> weights)
    {
        var roll = Random.Next(weights.Sum(w => w.Weight));
        foreach (var (kind, weight) in weights)
        {
            if (roll < weight)
                return kind;
            roll -= weight;
        }
        throw new InvalidOperationException("unreachable");
    }

    /// <summary>
    /// Runs one step and adds it to the trace and its outcome (or the outcome's
    /// <paramref name="category"/>) to those seen; fails if it threw anything but an assertion, or if
    /// the core's answer is not the model's. Returns the core's answer.
    /// </summary>
    public async Task<string> StepAsync<TKind>(TKind kind, Func<Task<(string Description, string Actual, string Expected)>> step, Func<string, string>? category = null)
    {
        (string Description, string Actual, string Expected) result;
        try
        {
            result = await step();
        }
        catch (Exception e) when (e is not Xunit.Sdk.XunitException)
        {
            Fail($"step {_trace.Count} ({kind}) threw {e}");
            throw;
        }
        _trace.Add($"#{_trace.Count,-3} {result.Description,-56} -> {result.Actual}");
        seen.Add($"{kind} {(category is null ? result.Actual : category(result.Actual))}");
        if (result.Actual != result.Expected)
            Fail($"the core answered {result.Actual}, the model {result.Expected}");
        return result.Actual;
    }

    public void Fail(string why) =>
        Assert.Fail($"""
            {name} failed: seed {seed}{_where}
            {why}
            trace ({_trace.Count} steps; replay with {seedVariable}={seed}):
            {string.Join('\n', _trace)}
            """);

    /// <summary>"ok", or how the core refused: <see cref="Unauthenticated"/> or the errno's name.</summary>
    public static string Outcome(Action call) => Outcome(() =>
    {
        call();
        return "ok";
    });

    /// <summary>What the call returns, or how the core refused: <see cref="Unauthenticated"/> or the errno's name.</summary>
    public static string Outcome(Func<string> call)
    {
        try
        {
            return call();
        }
        catch (ErrnoException e)
        {
            return e.Kind == ErrorKind.Unauthenticated ? Unauthenticated : e.Errno.ToString();
        }
    }
}
