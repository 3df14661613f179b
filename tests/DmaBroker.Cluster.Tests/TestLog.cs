using Microsoft.Extensions.Logging;
using Xunit.Abstractions;

namespace DmaBroker.Cluster.Tests;

/// <summary>The cluster store's log lines in the test's output, so a failure shows what etcd said.</summary>
public sealed class TestLog(ITestOutputHelper output, string replica) : ILogger
{
    public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => logLevel >= LogLevel.Information;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
    {
        try
        {
            output.WriteLine($"[{DateTime.UtcNow:HH:mm:ss.fff}] {replica}: {formatter(state, exception)}");
        }
        catch (InvalidOperationException)
        {
            // the test is over
        }
    }
}
