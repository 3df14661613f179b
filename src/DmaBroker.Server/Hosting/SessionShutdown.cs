using DmaBroker.Core;

namespace DmaBroker.Server.Hosting;

/// <summary>
/// Ends every session when the broker stops, so each is told <c>revoked</c> and released while
/// the server still serves its stream. It does so in <see cref="StoppingAsync"/>, which the host
/// runs for every service before any <see cref="IHostedService.StopAsync"/>: the web host
/// registers its server (GenericWebHostService) after every other hosted service, so it is the
/// first to stop, and an ordinary StopAsync here would run after Kestrel had stopped taking calls.
/// </summary>
internal sealed class SessionShutdown(Broker broker, BrokerHostOptions options, TimeProvider time) : IHostedLifecycleService
{
    public async Task StoppingAsync(CancellationToken cancellationToken)
    {
        try
        {
            await broker.Sessions.ShutdownAsync().WaitAsync(options.ShutdownGrace, time, cancellationToken);
        }
        catch (Exception e) when (e is TimeoutException || (e is OperationCanceledException && cancellationToken.IsCancellationRequested))
        {
            // A session whose teardown is still running must not keep the broker from stopping.
        }
    }

    public Task StartingAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public Task StartAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public Task StartedAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public Task StoppedAsync(CancellationToken cancellationToken) => Task.CompletedTask;
}
